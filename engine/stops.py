"""Stop strings over text that arrives in pieces.

Text that could be the beginning of a stop string is held back until the next piece decides it;
when a stop string appears, the text before it is the last that goes out (the stop string itself
never does, as in OpenAI's API).

    stops = StopMatcher(["\\n\\n", "END"])
    out, stopped = stops.push(piece)     # out: text safe to send now
    out = stops.flush()                  # the held-back tail, once generation ends otherwise
"""
from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str] | tuple[str, ...] = ()):
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text to send, whether a stop string ended the generation)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = self._partial_tail(buf)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out

    def _partial_tail(self, buf: str) -> int:
        """Length of the longest end of buf that is the start of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best
