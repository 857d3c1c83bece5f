"""Errors that several layers raise and catch, in one place below them all."""

from __future__ import annotations


class RequestRejected(ValueError):
    """One row refused, with OpenAI's error code: it goes to errors.jsonl, never to the engine."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
