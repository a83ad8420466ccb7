"""`nanoseek chat`: talk to a checkpoint in the terminal, the thinking shown dimmed and apart from the answer.

`Splitter` turns the stream of generated token ids into text deltas tagged `reasoning` (between `<think>` and
`</think>`) or `content` (the rest), as DeepSeek's API splits `reasoning_content` from `content`. It works on token
ids, where `</think>` is one token, so a tag can never be cut in half between two chunks; text is held back while it
ends inside a multi-byte character.
"""

import argparse
import sys

from nanoseek import fp8
from nanoseek.engine import Engine, SamplingParams
from nanoseek.errors import NanoseekError


class Splitter:
    """Generated token ids -> text deltas tagged `reasoning` / `content`. The split is made on the decoded text, so it
    holds whether `</think>` came as its own token or as several pieces ("</", "think>") in different chunks: while
    the text could still end inside the tag, that tail is held back."""

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, tok, thinking: bool):
        self.tok, self.starts_thinking = tok, thinking
        self.decoder = tok.decoder(skip_special_tokens=True)
        self.sent = {"reasoning": 0, "content": 0}  # characters already emitted
        self.opened = thinking  # a thought was opened (by the prompt or by the model)
        self.announced = False  # the first reasoning delta went out (an empty one if the thought is still empty)

    def split(self, final: bool) -> tuple[str, str]:
        text = self.decoder.text
        thinking = self.starts_thinking
        if not thinking and text.lstrip().startswith(self.OPEN):  # the model opened a thought itself
            text, thinking = text.lstrip()[len(self.OPEN):], True
        self.opened = thinking
        if not thinking:
            return "", text
        i = text.find(self.CLOSE)
        if i >= 0:
            return text[:i].strip(), text[i + len(self.CLOSE):].lstrip("\n")  # the template's "</think>\n\n"
        if not final:  # hold back what may be the start of "</think>"
            for k in range(len(self.CLOSE) - 1, 0, -1):
                if text.endswith(self.CLOSE[:k]):
                    text = text[:-k]
                    break
        # the reasoning is sent stripped, as the whole turn's is: trailing whitespace waits for what follows it
        return text.strip(), ""

    def feed(self, ids: list[int], final: bool = False) -> list[tuple[str, str]]:
        """New token ids -> [(kind, text delta)]. An opened thought is announced by its first reasoning delta, an
        empty one if it has no text yet, so a client knows of a thought that a budget cut leaves empty."""
        self.decoder.feed([t for t in ids if t != self.tok.eos_id], final)
        out = []
        for kind, text in zip(("reasoning", "content"), self.split(final)):
            if len(text) > self.sent[kind] or (kind == "reasoning" and self.opened and not self.announced):
                out.append((kind, text[self.sent[kind]:]))
                self.sent[kind] = len(text)
                self.announced |= kind == "reasoning"
        return out

    def texts(self) -> tuple[str, str]:
        reasoning, content = self.split(final=True)
        return reasoning.strip(), content


def run_turn(engine, messages, params, out=sys.stdout, color: bool = False) -> str:
    """Generate one assistant turn, streaming it to `out`; returns the answer (content) text."""
    tok = engine.tok
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    req = engine.add(prompt, params)
    split = Splitter(tok, req.starts_thinking)
    dim, reset = ("\033[2m", "\033[0m") if color else ("", "")
    state = None
    while not req.done:
        engine.step()
        new = req.stream()
        for kind, delta in split.feed(new, final=req.done):
            if kind != state:
                if kind == "reasoning":
                    out.write(dim + ("" if color else "[thinking] "))
                else:
                    out.write(reset + ("\n" if state == "reasoning" else "") + ("" if color else "[answer] "))
                state = kind
            out.write(delta)
            out.flush()
    out.write(reset + "\n")
    out.flush()
    return split.texts()[1]


def load_engine(args, max_batch: int) -> Engine:
    """The checkpoint in an engine with the CLI's decode flags (serve and chat): the compiled decode step unless
    --no-compile, compiled now (warm-up) so that the first request does not wait; eager, with one line saying why,
    where compiling fails."""
    model = fp8.from_pretrained(args.checkpoint, dequantize=args.dequantize)
    if fp8.weights_line(model):
        print(fp8.weights_line(model), file=sys.stderr, flush=True)
    if model.tokenizer is None:
        raise NanoseekError(f"{args.checkpoint} has no tokenizer.json; chat and serve need one")
    engine = Engine(model, max_batch=max_batch, max_len=getattr(args, "max_len", None), compile=args.compile,
                    speculative=args.speculative)
    if engine.compile:
        print("compiling the decode step (once per shape; seconds once cached, --no-compile skips it)...",
              file=sys.stderr, flush=True)
        took = engine.warm_up()
        print(f"  compiled in {took:.1f} s" if engine.compile else
              f"  torch.compile is unavailable here ({engine.compile_error}); decoding eagerly", file=sys.stderr,
              flush=True)
    return engine


def add_decode_args(sp) -> None:
    """The decode flags that serve and chat share."""
    sp.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="the compiled decode step (default; compiled at start, several times faster per token); "
                         "--no-compile decodes eagerly")
    sp.add_argument("--dequantize", action="store_true",
                    help="an FP8 checkpoint's weights dequantised at load (2x the memory of bf16 weights kept in FP8, "
                         "4x in fp32; faster per token on a CPU, which has no FP8 GEMM)")
    sp.add_argument("--speculative", action="store_true",
                    help="MTP speculative decoding (needs a checkpoint with an MTP module; requests with logprobs "
                         "or a thinking budget decode plainly)")


def main(args) -> None:
    engine = load_engine(args, max_batch=1)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, thinking_budget=args.think_budget).validate()
    color = sys.stdout.isatty() and not args.no_color
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        messages.append({"role": "user", "content": args.prompt})
        run_turn(engine, messages, params, color=color)
        return
    print("nanoseek chat: type a message; an empty line or Ctrl-D ends the session", file=sys.stderr)
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            break
        if not line.strip() or line.strip() in ("exit", "quit"):
            break
        messages.append({"role": "user", "content": line})
        answer = run_turn(engine, messages, params, color=color)
        messages.append({"role": "assistant", "content": answer})


def add_args(sp) -> None:
    sp.add_argument("--checkpoint", required=True, help="checkpoint directory (with tokenizer files)")
    sp.add_argument("--prompt", default=None, help="one-shot: answer this message and exit (default: interactive)")
    sp.add_argument("--system", default=None, help="a system prompt (R1's advice: none)")
    sp.add_argument("--think-budget", type=int, default=None, help="max thinking tokens; then </think> is forced")
    sp.add_argument("--max-tokens", type=int, default=512, help="max tokens per answer, thinking included")
    sp.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (R1: 0.6; 0 = greedy)")
    sp.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (R1: 0.95)")
    sp.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    sp.add_argument("--seed", type=int, default=None, help="sampling seed")
    sp.add_argument("--no-color", action="store_true", help="mark thinking with [thinking] instead of dim text")
    add_decode_args(sp)
