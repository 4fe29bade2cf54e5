"""AI Rate Limiter: LLM prompts through provider rate limits, as serverless functions."""
