"""The offline API: ``LLM(model, **options).generate(prompts, sampling_params)``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine, PromptType
from tandem.engine.outputs import RequestOutput
from tandem.engine.sampling_params import RequestOutputKind, SamplingParams
from tqdm import tqdm


class LLM:
    """Options are the config fields under the CLI flag names (``dtype``, ``block_size``,
    ``max_model_len``, ``max_num_seqs``, ``max_num_batched_tokens``, ``kv_cache_memory``,
    ``enable_prefix_caching``, ``seed``, ...); ``model=None`` is the default model."""

    def __init__(self, model: str | None = None, **options: Any) -> None:
        self.engine = LLMEngine(EngineConfig.from_options(model=model, **options))

    def get_tokenizer(self):
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """vLLM's ``LLM.reset_prefix_cache``: ``EngineCore.reset_prefix_cache``."""
        return self.engine.core.reset_prefix_cache()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"sampling_params: {len(params_list)} given for {len(prompts)} prompts"
                )
        ids = []
        try:
            for prompt, params in zip(prompts, params_list):
                params = _final_only(params)
                ids.append(self.engine.add_request(None, prompt, params))
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Chat with the model's chat template; one conversation or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conversation in conversations:
            text = self.engine.tokenizer.apply_chat_template(
                conversation,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                chat_template=chat_template,
            )
            # The template already holds any special tokens; don't add them twice.
            token_ids = self.engine.tokenizer(text, add_special_tokens=False).input_ids
            prompts.append({"prompt": text, "prompt_token_ids": token_ids})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm)
        start, num_output_tokens = time.perf_counter(), 0
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        num_output_tokens += sum(len(c.token_ids) for c in output.outputs)
                        bar.update(1)
                        elapsed = time.perf_counter() - start
                        bar.set_postfix_str(f"output: {num_output_tokens / elapsed:.1f} toks/s")
        finally:
            bar.close()
        return [finished[rid] for rid in request_ids]


def _final_only(params: SamplingParams) -> SamplingParams:
    if params.output_kind is RequestOutputKind.FINAL_ONLY:
        return params
    values = {k: v for k, v in params.__dict__.items() if k != "all_stop_token_ids"}
    return SamplingParams(**{**values, "output_kind": RequestOutputKind.FINAL_ONLY})
