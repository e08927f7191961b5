"""Anthropic's Messages API: its requests as chat requests and its answers
shaped as Anthropic's clients read them (``messages``); its routes (``routes``)."""
