"""The wire format: OpenAI's batch lines in and out.

openai_format.py  request bodies checked and prepared per endpoint; output and error lines
responses.py      /v1/responses lines: asked as chat completions, answered as Response objects
media.py          what a row may make this machine read (one policy for every source)
images.py         `image_url` content parts, fetched under that policy
"""
