"""OpenAI's surfaces: chat completions and completions (``chat``), Responses
(``responses``, its tools, the turn it continues, the store), Conversations,
embeddings; ``routes`` and ``conversations`` hold their HTTP routes."""
