"""Validate responses and chunks against the response schemas of OpenAI's OpenAPI spec.

The schemas used (and every schema they reference) are extracted from the spec once into
`openai_schemas.json` beside this file, descriptions stripped, so that the tests need neither
the 87k-line spec nor a network. Regenerate with:

    python tests/openai_compat/openai_schema.py path/to/openai-openapi.yaml

The spec is OpenAPI 3.1 but marks nullable fields with 3.0's `nullable: true`; `to_json_schema`
turns those into JSON Schema (`type: [X, "null"]`, or `anyOf [..., {type: null}]`).
"""

from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

SCHEMAS_FILE = Path(__file__).with_name("openai_schemas.json")
ROOTS = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
)
_DROP = {"description", "example", "examples", "x-oaiMeta", "x-oaiTypeLabel", "deprecated", "title"}


def extract(spec_path: str) -> dict[str, Any]:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(spec_path) as f:
        schemas = yaml.load(f, Loader=loader)["components"]["schemas"]
    keep: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    name = value.rsplit("/", 1)[-1]
                    if name not in keep:
                        keep.add(name)
                        walk(schemas[name])
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for root in ROOTS:
        keep.add(root)
        walk(schemas[root])

    def strip(node: Any, in_properties: bool = False) -> Any:
        if isinstance(node, dict):
            # The keys of "properties" are field names (one is "title"), never keywords to drop.
            return {
                k: strip(v, k == "properties" and not in_properties)
                for k, v in node.items()
                if in_properties or k not in _DROP
            }
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return {name: strip(schemas[name]) for name in sorted(keep)}


def to_json_schema(node: Any) -> Any:
    """OpenAPI 3.0 `nullable: true` → JSON Schema, recursively."""
    if isinstance(node, list):
        return [to_json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        if isinstance(out.get("type"), str) and not any(k in out for k in ("$ref", "allOf", "anyOf", "oneOf")):
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def _defs() -> dict[str, Any]:
    with open(SCHEMAS_FILE) as f:
        return to_json_schema(json.load(f))


def validator(name: str) -> jsonschema.Draft202012Validator:
    defs = _defs()
    schema = {**defs[name], "components": {"schemas": defs}}
    return jsonschema.Draft202012Validator(schema)


def validate(name: str, document: Any) -> None:
    """Raise jsonschema.ValidationError unless `document` is a valid `name`."""
    validator(name).validate(document)


if __name__ == "__main__":
    SCHEMAS_FILE.write_text(json.dumps(extract(sys.argv[1]), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SCHEMAS_FILE}")
