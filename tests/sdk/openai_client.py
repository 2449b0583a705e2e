"""Drives `aipipe serve` with the official openai Python SDK, as an application would.

Usage: openai_client.py SCENARIO REQUEST_JSON. The gateway's address and key come from
OPENAI_BASE_URL and OPENAI_API_KEY (the SDK reads them). Prints one JSON object: what the
client saw, with the arrival time of every chunk, for the Rust test to judge.
"""

import json
import sys
import time

import openai
from openai import OpenAI


def chunk_record(chunk, started):
    record = {"at": time.monotonic() - started, "usage": None, "content": None, "tool_calls": [], "finish": None}
    if chunk.usage is not None:
        record["usage"] = chunk.usage.model_dump()
    if chunk.choices:
        choice = chunk.choices[0]
        record["content"] = choice.delta.content
        record["finish"] = choice.finish_reason
        for call in choice.delta.tool_calls or []:
            record["tool_calls"].append(
                {"index": call.index, "id": call.id, "name": call.function.name if call.function else None,
                 "arguments": call.function.arguments if call.function else None})
    return record


def stream(client, request):
    started = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(stream=True, **request)
    source = raw.headers.get("x-aipipe-source")
    chunks = [chunk_record(chunk, started) for chunk in raw.parse()]
    content = "".join(chunk["content"] or "" for chunk in chunks)
    arguments = {}
    for chunk in chunks:
        for call in chunk["tool_calls"]:
            entry = arguments.setdefault(call["index"], {"id": None, "name": None, "arguments": ""})
            entry["id"] = call["id"] or entry["id"]
            entry["name"] = call["name"] or entry["name"]
            entry["arguments"] += call["arguments"] or ""
    return {"source": source, "cost_usd": raw.headers.get("x-aipipe-cost-usd"), "chunks": chunks, "content": content,
            "tool_calls": [arguments[index] for index in sorted(arguments)],
            "content_chunks": sum(1 for chunk in chunks if chunk["content"]),
            "finish": next((chunk["finish"] for chunk in chunks if chunk["finish"]), None),
            "usage": next((chunk["usage"] for chunk in chunks if chunk["usage"]), None)}


def complete(client, request):
    raw = client.chat.completions.with_raw_response.create(**request)
    completion = raw.parse()
    message = completion.choices[0].message
    return {"source": raw.headers.get("x-aipipe-source"), "content": message.content,
            "tool_calls": [{"id": call.id, "name": call.function.name, "arguments": call.function.arguments}
                           for call in message.tool_calls or []],
            "finish": completion.choices[0].finish_reason, "usage": completion.usage.model_dump()}


def mid_stream_error(client, request):
    started = time.monotonic()
    seen = []
    try:
        for chunk in client.chat.completions.create(stream=True, **request):
            seen.append(chunk_record(chunk, started))
    except openai.APIError as error:
        return {"error": type(error).__name__, "message": str(error), "chunks": seen}
    return {"error": None, "chunks": seen}


def disconnect(client, request):
    """Reads the first piece of content, then hangs up."""
    response = client.chat.completions.create(stream=True, **request)
    for chunk in response:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    response.close()
    return {"closed": True}


def failure(client, request):
    try:
        complete(client, request)
    except openai.APIStatusError as error:
        return {"status": error.status_code, "body": error.body}
    return {"status": 200}


def embeddings(client, request):
    """The same texts as floats and as base64 (the SDK's default, decoded by the SDK)."""
    as_floats = client.embeddings.create(encoding_format="float", **request)
    as_base64 = client.embeddings.create(**request)
    return {"model": as_floats.model, "floats": [item.embedding for item in as_floats.data],
            "decoded": [item.embedding for item in as_base64.data], "usage": as_floats.usage.model_dump()}


SCENARIOS = {"embeddings": embeddings, "stream": stream, "complete": complete, "mid_stream_error": mid_stream_error,
             "disconnect": disconnect, "failure": failure}

if __name__ == "__main__":
    scenario, request = sys.argv[1], json.loads(sys.argv[2])
    client = OpenAI(max_retries=0, timeout=30)
    print(json.dumps(SCENARIOS[scenario](client, request)))
