"""Finding tool calls in generated text as it streams: `CallStream`, one per choice.

Every supported format is text, then a region of calls, then maybe more text. A region opens
with a trigger (`<tool_call>`, `[TOOL_CALLS]`, `<|python_tag|>`, or for Llama a `{` at the very
start), holds one or more call objects `{"name": ..., "arguments": {...}}` (`CallSyntax` says
what comes between them and what closes it), and the text around it is the message's content.

A call is committed, and its first delta (id, name) sent, once its head `{"name": "f",
"arguments": ` has been read and `f` is a function the request may call; its arguments then
stream as they are generated, character for character. Until then the region's text is only
held back: if it turns out not to be a call (not JSON, no such function, the text ends first)
it is released as content, so with `tool_choice` `auto` a malformed call is text, never an
error. An object whose keys come in another order is read whole, then committed at once.

Content is held back where it might be the start of a trigger, and whitespace next to a call
(the newline before `<tool_call>`, between calls, after the last one) is dropped; at the end,
trailing whitespace is kept only when the turn made no call, so a text answer reads exactly
as it would without tools. Feeding the whole text at once gives the same result as feeding it
piece by piece: the non-streaming response is built the same way.
"""

from __future__ import annotations

import enum
import json
import secrets
from collections.abc import Collection
from dataclasses import dataclass, field

from openai_compat.tool_calls.json_scan import Head, JsonValueScanner, match_call_head

_WHITESPACE = " \t\r\n"
# A call's head is short (a name is at most 64 characters): one still unfinished past this is
# read whole instead, so that a runaway head is not matched again at every token.
_MAX_HEAD_LEN = 256


@dataclass(frozen=True, slots=True)
class CallSyntax:
    """How a format writes its calls (see the module docstring)."""

    triggers: tuple[str, ...]  # text that opens a region of calls
    item_trigger: str | None = None  # opens a region and is the first item's own first character
    start_only: bool = False  # triggers count only before any content
    open: str = ""  # after the trigger, before the first item
    separator: str | None = None  # between the items of one region; None: one item per region
    close: str | None = None  # ends a region; None: the region ends where its items do
    argument_keys: tuple[str, ...] = ("arguments", "parameters")


@dataclass(slots=True)
class CallDelta:
    """A piece of one call: the first carries `id` and `name`, later ones only `arguments`."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class ParsedDelta:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def extend(self, other: ParsedDelta) -> None:
        self.content += other.content
        for call in other.calls:
            self.add_call(call)

    def add_call(self, call: CallDelta) -> None:
        last = self.calls[-1] if self.calls else None
        if last is not None and last.index == call.index and call.id is None:
            last.arguments += call.arguments  # one delta per call per feed
        else:
            self.calls.append(call)


class _State(enum.Enum):
    TEXT = 0
    OPEN = 1  # after a trigger, before `open`
    ITEM_START = 2  # before an item's `{`
    HEAD = 3  # reading `{"name": "f", "arguments": `
    WHOLE = 4  # reading an object whole (keys in another order)
    ARGS = 5  # streaming a committed call's arguments
    TAIL = 6  # after the arguments, up to the object's `}`
    AFTER = 7  # after an item: a separator, the close, or the region's end


_UNCOMMITTED = (_State.OPEN, _State.ITEM_START, _State.HEAD, _State.WHOLE)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class CallStream:
    """The calls and the content in one choice's generated text, fed piece by piece."""

    def __init__(self, syntax: CallSyntax, callable_names: Collection[str], max_calls: int | None = None) -> None:
        self.syntax = syntax
        self.callable_names = callable_names
        self.max_calls = max_calls
        self.num_calls = 0
        self._state = _State.TEXT
        self._buf = ""  # fed, not yet read
        self._raw = ""  # read since the region (or its last committed call) began: released if no call
        self._pending_ws = ""  # trailing whitespace of the content, held
        self._drop_ws = False  # a region just closed: drop the whitespace that follows it
        self._text_started = False
        self._scanner = JsonValueScanner()
        self._index: int | None = None  # the committed call being read; None while dropping one
        self._string_args: str | None = None  # arguments written as a JSON string, decoded at its end
        self._item_at = 0  # where the current item starts in `_raw`
        self._out = ParsedDelta()

    def feed(self, text: str) -> ParsedDelta:
        self._buf += text
        self._run()
        out, self._out = self._out, ParsedDelta()
        return out

    def finish(self) -> ParsedDelta:
        """The end of the text: release what was held, close what was open."""
        self._run()
        while self._state in _UNCOMMITTED:
            self._release()
            self._run()
        if self._state is _State.ARGS and self._string_args is not None and self._index is not None:
            self._out.add_call(CallDelta(self._index, arguments=self._string_args))  # cut short: as written
        if self._state is _State.TEXT:
            self._text(self._buf)
            self._buf = ""
            if self.num_calls == 0:
                self._out.content += self._pending_ws
            self._pending_ws = ""
        out, self._out = self._out, ParsedDelta()
        return out

    # -- the state machine -----------------------------------------------------------------

    def _run(self) -> None:
        handlers = {
            _State.TEXT: self._on_text, _State.OPEN: self._on_open, _State.ITEM_START: self._on_item_start,
            _State.HEAD: self._on_head, _State.WHOLE: self._on_whole, _State.ARGS: self._on_args,
            _State.TAIL: self._on_tail, _State.AFTER: self._on_after,
        }
        while self._buf and handlers[self._state]():
            pass

    def _consume(self, n: int) -> str:
        """Read `n` characters of the buffer; they are kept in `_raw` until a commit."""
        taken, self._buf = self._buf[:n], self._buf[n:]
        self._raw += taken
        return taken

    def _on_text(self) -> bool:
        syntax, buf = self.syntax, self._buf
        if syntax.start_only:
            if self._text_started or self.num_calls:
                self._text(buf)
                self._buf = ""
                return False
            body = buf.lstrip(_WHITESPACE)
            if not body:
                return False  # only whitespace so far: the first real character decides
            if syntax.item_trigger is not None and body.startswith(syntax.item_trigger):
                self._raw = ""
                self._consume(len(buf) - len(body))  # kept: released with the rest if not a call
                self._enter_item()
                return True
            trigger = next((t for t in syntax.triggers if body.startswith(t)), None)
            if trigger is not None:
                self._open_region(len(buf) - len(body) + len(trigger))
                return True
            if any(t.startswith(body) for t in syntax.triggers):
                return False
            self._text(buf)
            self._buf = ""
            return False
        found = [(buf.find(t), t) for t in syntax.triggers]
        hits = [(i, t) for i, t in found if i >= 0]
        if hits:
            i, trigger = min(hits)
            self._text(buf[:i])
            held_ws, self._pending_ws = self._pending_ws, ""  # whitespace before a call is the call's
            self._buf = held_ws + buf[i:]
            self._open_region(len(held_ws) + len(trigger))
            return True
        held = _held_suffix(buf, syntax.triggers)
        self._text(buf[: len(buf) - held])
        self._buf = buf[len(buf) - held:]
        return False

    def _open_region(self, trigger_end: int) -> None:
        self._raw = ""
        self._state = _State.OPEN
        self._consume(trigger_end)

    def _on_open(self) -> bool:
        self._consume(len(self._buf) - len(self._buf.lstrip(_WHITESPACE)))
        opening = self.syntax.open
        if not self._buf:
            return False
        if self._buf.startswith(opening):
            self._consume(len(opening))
            self._state = _State.ITEM_START
            return True
        if opening.startswith(self._buf):
            return False
        self._release()
        return True

    def _on_item_start(self) -> bool:
        self._consume(len(self._buf) - len(self._buf.lstrip(_WHITESPACE)))
        if not self._buf:
            return False
        if self._buf[0] == "{":
            self._enter_item()
            return True
        self._release()
        return True

    def _enter_item(self) -> None:
        self._item_at = len(self._raw)
        self._state = _State.HEAD

    def _on_head(self) -> bool:
        self._consume(len(self._buf))
        item = self._raw[self._item_at:]
        head = match_call_head(item, self.syntax.argument_keys)
        if head.state is Head.PARTIAL and len(item) <= _MAX_HEAD_LEN:
            return False
        if head.state is Head.MATCH and head.name in self.callable_names:
            self._commit(head.name)
            self._buf = item[head.end:]
            self._scanner = JsonValueScanner()
            self._string_args = "" if self._buf.lstrip(_WHITESPACE).startswith('"') else None
            self._state = _State.ARGS
            return True
        # Not the head we stream from: read the object whole, then decide.
        self._raw = self._raw[: self._item_at]
        self._buf = item + self._buf
        self._scanner = JsonValueScanner()
        self._state = _State.WHOLE
        return True

    def _on_whole(self) -> bool:
        n = self._scanner.feed(self._buf)
        self._consume(n)
        if not self._scanner.done:
            return False
        call = _read_call(self._raw[self._item_at:], self.syntax.argument_keys)
        if call is None or call[0] not in self.callable_names:
            self._release()
            return True
        self._commit(call[0])
        if self._index is not None:
            self._out.add_call(CallDelta(self._index, arguments=call[1]))
        self._end_item()
        return True

    def _on_args(self) -> bool:
        n = self._scanner.feed(self._buf)
        piece = self._consume(n)
        if self._string_args is not None:
            self._string_args += piece
        elif piece and self._index is not None:
            self._out.add_call(CallDelta(self._index, arguments=piece))
        if not self._scanner.done:
            return False
        if self._string_args is not None and self._index is not None:
            try:
                decoded = json.loads(self._string_args)
            except ValueError:
                decoded = self._string_args
            self._out.add_call(CallDelta(self._index, arguments=decoded if isinstance(decoded, str) else self._string_args))
        self._scanner = JsonValueScanner.inside()
        self._state = _State.TAIL
        return True

    def _on_tail(self) -> bool:
        self._consume(self._scanner.feed(self._buf))
        if not self._scanner.done:
            return False
        self._end_item()
        return True

    def _on_after(self) -> bool:
        self._consume(len(self._buf) - len(self._buf.lstrip(_WHITESPACE)))
        if not self._buf:
            return False
        syntax = self.syntax
        if syntax.separator is not None and (self._buf.startswith(syntax.separator) or self._buf[0] == "{"):
            if self._buf.startswith(syntax.separator):
                self._consume(len(syntax.separator))
            self._raw = ""
            self._state = _State.ITEM_START
            return True
        if syntax.close is not None and self._buf.startswith(syntax.close):
            self._consume(len(syntax.close))
        elif any(m is not None and m.startswith(self._buf) for m in (syntax.close, syntax.separator)):
            return False
        self._state = _State.TEXT  # the region ends here, closed or not
        self._drop_ws = True
        return True

    # -- helpers ---------------------------------------------------------------------------

    def _commit(self, name: str) -> None:
        self._raw = ""
        if self.max_calls is not None and self.num_calls >= self.max_calls:
            self._index = None  # parallel_tool_calls false: a second call is read and dropped
            return
        self._index = self.num_calls
        self.num_calls += 1
        self._out.add_call(CallDelta(self._index, id=new_call_id(), name=name))

    def _end_item(self) -> None:
        self._raw = ""
        self._state = _State.AFTER

    def _release(self) -> None:
        """Not a call after all: what the region held is content. Its first character (after
        any whitespace) is content at once, so the rest is read again as text and a trigger
        cannot loop."""
        text = self._raw + self._buf
        self._raw, self._buf = "", ""
        self._state = _State.TEXT
        first = len(text) - len(text.lstrip(_WHITESPACE)) + 1
        self._text(text[:first])
        self._text_started = True
        self._buf = text[first:]

    def _text(self, text: str) -> None:
        if not text:
            return
        if self._drop_ws:
            text = text.lstrip(_WHITESPACE)
            if not text:
                return
            self._drop_ws = False
        text = self._pending_ws + text
        body = text.rstrip(_WHITESPACE)
        self._pending_ws = text[len(body):]
        if body:
            self._out.content += body
            self._text_started = True


def _held_suffix(text: str, triggers: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that is the start of a trigger."""
    longest = 0
    for trigger in triggers:
        for n in range(min(len(trigger) - 1, len(text)), longest, -1):
            if text.endswith(trigger[:n]):
                longest = n
                break
    return longest


def _read_call(text: str, argument_keys: tuple[str, ...]) -> tuple[str, str] | None:
    """(name, arguments as a JSON string) from a whole call object, or None."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    key = next((k for k in argument_keys if k in obj), None)
    args = obj[key] if key is not None else {}
    if isinstance(args, str):
        return obj["name"], args
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)
