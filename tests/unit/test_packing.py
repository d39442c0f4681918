from inference.engines.base import Prepared
from inference.errors import ItemError
from inference.packing import pack_requests, run_packed, unpack_answer
from inference.schema import Request, Result


def chat(text: str, max_tokens: int = 4) -> Request:
    return Request(
        task="chat",
        messages=({"role": "user", "content": text},),
        max_tokens=max_tokens,
        temperature=0.0,
    )


def test_pack_numbers_the_questions_and_sums_max_tokens() -> None:
    packed = pack_requests([chat("is it red?"), chat("is it\nblue?", 6)])
    assert packed.messages[-1]["content"] == "1: is it red?\n2: is it blue?"
    assert "2 numbered tasks" in packed.messages[0]["content"]
    assert packed.max_tokens == 10


def test_answers_are_parsed_back_in_order() -> None:
    assert unpack_answer("1: yes\n2) no\n3. maybe\nreally", 3) == ["yes", "no", "maybe\nreally"]


def test_answers_that_do_not_follow_the_format_do_not_parse() -> None:
    assert unpack_answer("1: yes\n3: no", 3) is None
    assert unpack_answer("Sure! 1: yes 2: no", 2) is None
    assert unpack_answer("1: yes", 2) is None
    assert unpack_answer("1: a\n2: b\n3: c", 2) is None


class _ScriptedEngine:
    """A deterministic engine implementing the contract: it answers packed prompts correctly
    when ``follow`` is set, garbles them otherwise, and echoes single prompts."""

    model_name = "scripted"
    tasks = frozenset({"chat"})
    context_len = 10_000
    max_batch_size = 64

    def __init__(self, follow: bool) -> None:
        self.follow = follow
        self.prompts: list[str] = []

    def prepare(self, request: Request) -> Prepared:
        return Prepared(request, [1] * 5)

    def run(self, batch: list[Prepared]) -> list[Result | ItemError]:
        out: list[Result | ItemError] = []
        for item in batch:
            content = item.request.messages[-1]["content"]
            self.prompts.append(content)
            if len(item.request.messages) == 2 and self.follow:
                lines = content.splitlines()
                text = "\n".join(
                    f"{line.split(':')[0]}: ok {line.split(': ')[1]}" for line in lines
                )
            elif len(item.request.messages) == 2:
                text = "I cannot do that"
            else:
                text = f"single {content}"
            out.append(Result(output_text=text, completion_tokens=4, prompt_tokens=5))
        return out

    def close(self) -> None:
        pass


def _batch() -> list[Prepared]:
    return [Prepared(chat(f"q{i}"), [1] * 5) for i in range(5)]


def test_packed_answers_go_back_to_their_items() -> None:
    engine = _ScriptedEngine(follow=True)
    results = run_packed(engine, _batch(), lambda item: 2)
    texts = [r.output_text for r in results if isinstance(r, Result)]
    assert texts == ["ok q0", "ok q1", "ok q2", "ok q3", "single q4"]
    assert len(engine.prompts) == 3  # two packs of two, one left over


def test_unparsable_packs_fall_back_to_one_item_per_prompt() -> None:
    engine = _ScriptedEngine(follow=False)
    results = run_packed(engine, _batch(), lambda item: 2)
    assert [r.output_text for r in results if isinstance(r, Result)] == [
        f"single q{i}" for i in range(5)
    ]


def test_items_asking_for_logprobs_format_or_penalties_are_never_packed() -> None:
    import dataclasses

    options: list[dict[str, object]] = [
        {"logprobs": True},
        {"response_format": {"type": "json_object"}},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
    ]
    batch = [
        Prepared(dataclasses.replace(chat(f"q{i}"), **fields), [1] * 5)  # type: ignore[arg-type]
        for i, fields in enumerate(options)
    ]
    engine = _ScriptedEngine(follow=True)
    results = run_packed(engine, batch, lambda item: 4)
    assert [r.output_text for r in results if isinstance(r, Result)] == [
        f"single q{i}" for i in range(4)
    ]
