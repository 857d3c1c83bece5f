"""One line of an OpenAI Batch output or error file, typed: the envelope every answer, stored
answer and error is written in (vLLM's `BatchRequestOutput`, OpenAI's batch output line). The
body inside is the endpoint's own response object (a chat completion, a completion, an
embedding list, a Response), as the engine or server produced it."""

from __future__ import annotations

from pydantic import BaseModel


class BatchResponse(BaseModel):
    status_code: int = 200
    request_id: str
    body: dict


class BatchLine(BaseModel):
    """`{"id", "custom_id", "response", "error"}`: an answer has a response and no error, an
    error line the reverse. Ids are stable: the same row of the same job has the same ids."""

    id: str
    custom_id: str | None
    response: BatchResponse | None = None
    error: dict | None = None

    @classmethod
    def answered(cls, custom_id: str, request_id: str, body: dict) -> BatchLine:
        return cls(
            id=f"batch_req_{request_id}", custom_id=custom_id, response=BatchResponse(request_id=request_id, body=body)
        )

    @classmethod
    def failed(cls, custom_id: str | None, request_id: str, error: dict) -> BatchLine:
        return cls(id=f"batch_req_{request_id}", custom_id=custom_id, error=error)

    @property
    def body(self) -> dict:
        assert self.response is not None, "an error line has no body"
        return self.response.body

    def wire(self) -> dict:
        """The line as JSON-ready data, its keys in OpenAI's order."""
        return self.model_dump()
