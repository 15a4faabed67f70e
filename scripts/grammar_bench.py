"""Grammar libraries side by side: compile time, next-token bitmask time, hostile schemas.

    python scripts/grammar_bench.py [--tokenizer DIR] [--libs llguidance,xgrammar,outlines_core]
                                    [--rows 64] [--repeats 5] [--hostile]

With no `--tokenizer`, the embedded default model's (SmolLM2, 49 152 tokens). For each
library: the one-off tokenizer set-up; compiling a nested JSON schema (cold: no cache) and the
first mask after it; then a JSON document for that schema, tokenized by the model's tokenizer,
walked token by token: fill one row of the [rows, ceil(vocab / 32)] int32 bitmask, accept the
token (median and p99 per token, host time); then `--rows` matchers at different points of the
document stepped together, the whole batch's bitmask filled per step (one after another, and
through the library's parallel fill where it has one). `--hostile` compiles schemas meant to
stall a compiler, each in a child process killed after `--hostile-timeout` seconds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

NESTED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
        "status": {"enum": ["pending", "paid", "shipped", "cancelled"]},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 80},
                "email": {"type": "string"},
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string"},
                        "city": {"type": "string"},
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        "country": {"type": "string", "enum": ["US", "FR", "DE", "JP"]},
                    },
                    "required": ["street", "city", "zip", "country"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "email", "address"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 20,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 1000},
                    "price": {"type": "number", "minimum": 0},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "gift": {"type": "boolean"},
                },
                "required": ["sku", "quantity", "price"],
                "additionalProperties": False,
            },
        },
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "total": {"type": "number"},
    },
    "required": ["order_id", "status", "customer", "items", "total"],
    "additionalProperties": False,
}

DOCUMENT: dict[str, Any] = {
    "order_id": "ABC-123456",
    "status": "shipped",
    "customer": {
        "name": "Ada Lovelace",
        "email": "ada@example.org",
        "address": {"street": "12 Analytical Engine Road", "city": "London", "zip": "12345", "country": "FR"},
    },
    "items": [
        {"sku": "BOOK-0001", "quantity": 2, "price": 19.99, "tags": ["paper", "gift wrap"], "gift": True},
        {"sku": "PEN-77", "quantity": 10, "price": 1.5, "tags": []},
        {"sku": "LAMP-9", "quantity": 1, "price": 45.0, "tags": ["desk", "LED", "white"], "gift": False},
    ],
    "note": "Leave the parcel with the neighbour if nobody answers.",
    "total": 99.48,
}

HOSTILE: dict[str, dict[str, Any]] = {
    "array of 5 000 to 10 000 items": {"type": "array", "items": {"type": "integer"}, "minItems": 5000,
                                       "maxItems": 10000},
    "pattern (a|b)*a(a|b){24}": {"type": "string", "pattern": "^(a|b)*a(a|b){24}$"},
    "string of 2 000 to 100 000 chars": {"type": "string", "minLength": 2000, "maxLength": 100000},
    "objects nested 200 deep": {},  # filled below
    "enum of 20 000 strings": {"enum": [f"value-{i:05d}-{i * 7919 % 10007}" for i in range(20000)]},
    "300 optional properties": {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(300)}},
    "pattern [a-z]{1,5000}": {"type": "string", "pattern": "^[a-z]{1,5000}$"},
    "integer in [-123456789012, 987654321098]": {"type": "integer", "minimum": -123456789012,
                                                 "maximum": 987654321098},
    "anyOf of 200 objects": {"anyOf": [{"type": "object", "properties": {f"k{i}": {"type": "integer"}},
                                        "required": [f"k{i}"]} for i in range(200)]},
    "arrays 6 deep, 10 to 50 items each": {},  # filled below
}
_deep: dict[str, Any] = {"type": "integer"}
for _ in range(200):
    _deep = {"type": "object", "properties": {"x": _deep}, "required": ["x"], "additionalProperties": False}
HOSTILE["objects nested 200 deep"] = _deep
_deep = {"type": "integer"}
for _ in range(6):
    _deep = {"type": "array", "items": _deep, "minItems": 10, "maxItems": 50}
HOSTILE["arrays 6 deep, 10 to 50 items each"] = _deep


class Lib:
    """One library behind the few calls the benchmark makes (`compile`, `matcher`, `fill`,
    `accept`; `fill_parallel` where it fills many rows at once)."""

    name = ""

    def reset(self, matcher: Any) -> None:
        matcher.reset()

    def fill_parallel(self, matchers: list[Any], bitmask: torch.Tensor) -> bool:
        return False  # no parallel fill


class LLGuidance(Lib):
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg, self.llt = llguidance, llguidance.torch
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.executor = llguidance.LLExecutor()

    def compile(self, schema: str) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema)
        error = self.llg.LLMatcher.validate_grammar(grammar, self.tok)
        if error:
            raise ValueError(error)
        return grammar

    def matcher(self, compiled: Any) -> Any:
        m = self.llg.LLMatcher(self.tok, compiled, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        self.llt.fill_next_token_bitmask(matcher, bitmask, row)

    def accept(self, matcher: Any, token_id: int) -> bool:
        return bool(matcher.consume_token(token_id))

    def fill_parallel(self, matchers: list[Any], bitmask: torch.Tensor) -> bool:
        self.llt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        return True


class XGrammar(Lib):
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.batch = xgrammar.BatchGrammarMatcher()

    def compile(self, schema: str) -> Any:
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)  # cold, every time
        return compiler.compile_json_schema(schema, strict_mode=True)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, matcher: Any, token_id: int) -> bool:
        return bool(matcher.accept_token(token_id))

    def fill_parallel(self, matchers: list[Any], bitmask: torch.Tensor) -> bool:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)
        return True


class OutlinesCore(Lib):
    name = "outlines_core"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import outlines_core

        from engine.router.detokenizer import byte_level_pieces

        self.oc = outlines_core
        pieces = byte_level_pieces(tokenizer)  # token id -> its bytes (byte-level BPE)
        special = set(tokenizer.all_special_ids)
        by_bytes: dict[bytes, list[int]] = {}
        for token_id, piece in enumerate(pieces or []):
            if piece and token_id not in special:
                by_bytes.setdefault(piece, []).append(token_id)
        self.eos = tokenizer.eos_token_id
        self.vocab = outlines_core.Vocabulary(self.eos, by_bytes)

    def compile(self, schema: str) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(schema, r"[ ]?")
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        view = bitmask[row]
        matcher.write_mask_into(view.data_ptr(), view.numel(), view.element_size())

    def accept(self, matcher: Any, token_id: int) -> bool:
        if token_id == self.eos:  # its guide has no move for the end: the state must be final
            return bool(matcher.is_finished())
        try:
            matcher.advance(token_id)
            return True
        except Exception:
            return False


LIBS: dict[str, type[Lib]] = {c.name: c for c in (LLGuidance, XGrammar, OutlinesCore)}


def _us(seconds: list[float], q: float = 0.5) -> float:
    ordered = sorted(seconds)
    return 1e6 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_lib(cls: type[Lib], tokenizer: Any, vocab_size: int, rows: int, repeats: int) -> dict[str, Any]:
    lib, setup = _timed(lambda: cls(tokenizer, vocab_size))
    schema = json.dumps(NESTED_SCHEMA)
    compiles = [_timed(lambda: lib.compile(schema))[1] for _ in range(3)]
    compiled = lib.compile(schema)
    bitmask = torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)
    first_mask = []
    for _ in range(3):
        c, t_compile = _timed(lambda: lib.compile(schema))
        m = lib.matcher(c)
        first_mask.append(t_compile + _timed(lambda m=m: lib.fill(m, bitmask, 0))[1])
    ids = tokenizer(json.dumps(DOCUMENT), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    fills: list[float] = []
    accepts: list[float] = []
    m = lib.matcher(compiled)
    for _ in range(repeats):
        lib.reset(m)
        for token_id in [*ids, eos]:
            fills.append(_timed(lambda: lib.fill(m, bitmask, 0))[1])
            allowed = bool((bitmask[0, token_id // 32] >> (token_id % 32)) & 1)
            if not allowed:
                raise RuntimeError(f"{lib.name}: the document's token {token_id} is masked")
            ok, t = _timed(lambda t=token_id: lib.accept(m, t))
            if not ok:
                raise RuntimeError(f"{lib.name}: the document's token {token_id} is refused")
            accepts.append(t)
    batch_seq, batch_par = _batch_fill(lib, compiled, ids, rows, bitmask)
    return {
        "setup_s": setup, "compile_ms": 1e3 * min(compiles), "first_mask_ms": 1e3 * min(first_mask),
        "tokens": len(ids) + 1, "fill_p50_us": _us(fills), "fill_p99_us": _us(fills, 0.99),
        "fill_mean_us": 1e6 * statistics.fmean(fills), "accept_p50_us": _us(accepts),
        "batch_seq_ms": batch_seq, "batch_par_ms": batch_par,
    }


def _batch_fill(lib: Lib, compiled: Any, ids: list[int], rows: int, bitmask: torch.Tensor) -> tuple[float, float]:
    """Median ms to fill `rows` rows per step, the rows spread over the document and each
    accepting its next token after every step (back to the start at the end)."""
    results = []
    for parallel in (False, True):
        matchers = [lib.matcher(compiled) for _ in range(rows)]
        pos = [(i * len(ids)) // rows for i in range(rows)]
        for m, p in zip(matchers, pos, strict=True):
            for t in ids[:p]:
                lib.accept(m, t)
        times = []
        for _step in range(2 * len(ids)):
            if parallel:
                ok, t = _timed(lambda ms=matchers: lib.fill_parallel(ms, bitmask))
                if not ok:
                    return results[0], float("nan")
            else:
                t = _timed(lambda ms=matchers: [lib.fill(m, bitmask, i) for i, m in enumerate(ms)])[1]
            times.append(t)
            for i, m in enumerate(matchers):
                if pos[i] == len(ids):
                    lib.reset(m)
                    pos[i] = 0
                lib.accept(m, ids[pos[i]])
                pos[i] += 1
        results.append(1e3 * statistics.median(times))
    return results[0], results[1]


def _hostile_child(name: str, tokenizer_dir: str, vocab_size: int, schema: str, out: Any) -> None:
    from transformers import AutoTokenizer

    lib = LIBS[name](AutoTokenizer.from_pretrained(tokenizer_dir), vocab_size)
    out.put("ready")  # the clock starts now: the tokenizer's set-up is not the compile's
    start = time.perf_counter()
    try:
        m = lib.matcher(lib.compile(schema))
        lib.fill(m, torch.full((1, (vocab_size + 31) // 32), -1, dtype=torch.int32), 0)
        out.put(f"{1e3 * (time.perf_counter() - start):.0f} ms")
    except Exception as e:  # the library's refusal is the result
        out.put(f"refused in {1e3 * (time.perf_counter() - start):.0f} ms: {str(e).splitlines()[0][:90]}")


def hostile(names: list[str], tokenizer_dir: str, vocab_size: int, timeout: float) -> None:
    ctx = multiprocessing.get_context("spawn")
    print("\n| hostile schema | " + " | ".join(names) + " |\n| --- |" + " --- |" * len(names))
    for label, schema in HOSTILE.items():
        cells = []
        for name in names:
            out = ctx.Queue()
            child = ctx.Process(target=_hostile_child, args=(name, tokenizer_dir, vocab_size, json.dumps(schema), out))
            child.start()
            try:
                out.get(timeout=600)  # "ready"
            except queue.Empty:
                pass
            child.join(timeout)
            if child.is_alive():
                child.kill()
                child.join()
                cells.append(f"> {timeout:.0f} s (killed)")
            else:
                cells.append(out.get() if not out.empty() else f"died (exit {child.exitcode})")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default=None, help="a Hugging Face tokenizer directory")
    parser.add_argument("--vocab", type=int, default=None, help="the logits' width (default: the tokenizer's)")
    parser.add_argument("--libs", default=",".join(LIBS))
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hostile", action="store_true")
    parser.add_argument("--hostile-only", action="store_true", help="skip the timings")
    parser.add_argument("--hostile-timeout", type=float, default=30.0)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    if args.tokenizer is None:
        from engine.models.loader import resolve_model

        args.tokenizer = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab_size = args.vocab or len(tokenizer)
    names = args.libs.split(",")
    print(f"tokenizer {args.tokenizer}: {len(tokenizer)} tokens, logits {vocab_size} wide; torch threads "
          f"{torch.get_num_threads()}")
    rows = []
    for name in names if not args.hostile_only else []:
        try:
            r = bench_lib(LIBS[name], tokenizer, vocab_size, args.rows, args.repeats)
        except Exception as e:
            print(f"{name}: failed: {e}")
            continue
        rows.append((name, r))
        print(name, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    print(f"\n| library | set-up s | compile ms | compile + 1st mask ms | fill p50 / p99 / mean us | accept p50 us "
          f"| {args.rows} rows: one by one / parallel ms |\n| --- |" + " ---: |" * 6)
    for name, r in rows:
        print(f"| {name} | {r['setup_s']:.2f} | {r['compile_ms']:.1f} | {r['first_mask_ms']:.1f} | "
              f"{r['fill_p50_us']:.0f} / {r['fill_p99_us']:.0f} / {r['fill_mean_us']:.0f} | {r['accept_p50_us']:.0f} | "
              f"{r['batch_seq_ms']:.2f} / {r['batch_par_ms']:.2f} |")
    if args.hostile or args.hostile_only:
        hostile(names, args.tokenizer, vocab_size, args.hostile_timeout)


if __name__ == "__main__":
    main()
