"""The OpenAI-compatible router over prefill and decode instances; see README.md."""
