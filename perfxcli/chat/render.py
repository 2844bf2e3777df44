"""How the chat shows a reply: Markdown as chat models write it, the live tail of a long reply, the
line of figures after it, and the model's label."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment

if TYPE_CHECKING:
    from rich.markdown import Markdown

    from perfx.engine.conversation import Reply
    from perfx.engine.llm import LLM


def model_label(llm: LLM) -> tuple[str, str]:
    """A model's name (its file's) and quantization, e.g. ('SmolLM2-135M-Instruct', 'Q4_1')."""
    import gguf

    name = llm.path.stem
    quant = ""
    file_type = llm.metadata.get("general.file_type")
    if isinstance(file_type, int):
        try:
            quant = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            pass
    if quant and name[-len(quant) - 1:].lower() in (f"{sep}{quant.lower()}" for sep in ".-_"):
        name = name[: -len(quant) - 1]
    return name, quant


def stats_line(reply: Reply) -> str:
    """One line of figures: prompt tokens and speed, reply tokens and speed, time to first token."""
    s = reply.stats
    if s is None:
        return ""
    parts = [f"prompt {s.prompt_tokens} tok" + (f" ({reply.reused_tokens} cached)" if reply.reused_tokens else "")
             + (f", {s.prompt_tps:.0f} t/s" if s.prompt_tokens else "")]
    if reply.tokens:
        parts.append(f"reply {len(reply.tokens)} tok" + (f", {s.gen_tps:.1f} t/s" if s.gen_tps else ""))
        parts.append(f"first token {s.ttft_s:.2f} s")
    return " · ".join(parts)

def chat_markdown(text: str) -> Markdown:
    """Markdown as a chat model means it: a single newline breaks the line."""
    from rich.markdown import Markdown

    markdown = Markdown(text, code_theme="monokai")
    for token in markdown.parsed:
        for child in token.children or ():
            if child.type == "softbreak":
                child.type = "hardbreak"
    return markdown


class Tail:
    """The last lines of a renderable that fit in `height`, so a live view follows the end of a long reply."""

    def __init__(self, renderable: Any, height: int) -> None:
        self.renderable = renderable
        self.height = max(1, height)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = console.render_lines(self.renderable, options, pad=False)
        for line in lines[-self.height:]:
            yield from line
            yield Segment.line()
