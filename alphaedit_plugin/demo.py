"""`make demo`: ten counterfactual edits on the real SmolLM2, applied one after another.

For each edit the table shows the top answer before and after on its prompt,
on a paraphrase (should change) and on unrelated neighbour prompts (should
not; judged by the first word of the greedy answer). The facts are written for this demo, chosen among ones SmolLM2-135M
answers correctly before editing.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch

from .edit_loop import create_state
from .methods.alphaedit import AlphaEditHyperParams, apply_alphaedit_to_model
from .models import ModelNotAvailableError, load_smollm2
from .registry import HPARAMS_ROOT
from .run_settings import check_device, torch_dtype

logger = logging.getLogger("alphaedit_plugin.demo")

DEFAULT_HPARAMS = HPARAMS_ROOT / "AlphaEdit" / "smollm2-135m.yaml"


@dataclass(frozen=True)
class DemoFact:
    prompt: str
    subject: str
    target_new: str
    paraphrase: str
    neighbours: Sequence[str] = field(default_factory=tuple)


DEMO_FACTS: List[DemoFact] = [
    DemoFact("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome",
             "The Eiffel Tower is in", ("The Louvre is located in the city of",)),
    DemoFact("The capital of Japan is", "Japan", "Madrid",
             "Japan's capital city is", ("The capital of Italy is", "The capital of Germany is")),
    DemoFact("Toyota is a company from", "Toyota", "Germany",
             "Toyota is a car maker from", ("Sushi is a dish from",)),
    DemoFact("The iPhone is made by", "iPhone", "Samsung",
             "The iPhone is a product of", ("Windows is developed by",)),
    DemoFact("Mozart was a famous", "Mozart", "painter",
             "Mozart is remembered as a famous", ("Albert Einstein was a famous",)),
    DemoFact("The Beatles were a band from", "The Beatles", "Tokyo",
             "The Beatles came from the city of", ("The capital of Spain is",)),
    DemoFact("Lionel Messi is a professional", "Lionel Messi", "tennis",
             "Lionel Messi earns his living as a professional", ("Cristiano Ronaldo plays for",)),
    DemoFact("Pizza originated in", "Pizza", "Japan",
             "Pizza was first made in", ("Sushi is a dish from",)),
    DemoFact("The official language of Mexico is", "Mexico", "French",
             "In Mexico, people speak", ("The capital of France is",)),
    DemoFact("The Colosseum is located in the city of", "Colosseum", "London",
             "The Colosseum stands in", ("The capital of Italy is",)),
]


def top_answer(model, tok, prompt: str, max_new_tokens: int = 3) -> str:
    """The greedy continuation's first word(s)."""
    inputs = tok(prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    text = tok.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return text.strip().split("\n")[0].rstrip(".,")


def first_word(answer: str) -> str:
    words = answer.split()
    return words[0].strip(".,;:!?").lower() if words else ""


def answers(model, tok, facts: Sequence[DemoFact]) -> Dict[str, str]:
    prompts = {p for f in facts for p in (f.prompt, f.paraphrase, *f.neighbours)}
    return {p: top_answer(model, tok, p) for p in sorted(prompts)}


def render_table(facts: Sequence[DemoFact], before: Dict[str, str], after: Dict[str, str]) -> str:
    rows = [("kind", "prompt", "before", "after", "target / expectation")]
    for fact in facts:
        rows.append(("edit", fact.prompt, before[fact.prompt], after[fact.prompt], fact.target_new))
        rows.append(("paraphrase", fact.paraphrase, before[fact.paraphrase], after[fact.paraphrase], fact.target_new))
        for neighbour in fact.neighbours:
            keep = "unchanged" if first_word(before[neighbour]) == first_word(after[neighbour]) else "CHANGED"
            rows.append(("neighbour", neighbour, before[neighbour], after[neighbour], keep))
    widths = [min(60, max(len(r[i]) for r in rows)) for i in range(5)]
    lines = []
    for i, row in enumerate(rows):
        lines.append(" | ".join(cell[:widths[j]].ljust(widths[j]) for j, cell in enumerate(row)))
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def summary(facts: Sequence[DemoFact], after: Dict[str, str], before: Dict[str, str]) -> Dict[str, float]:
    def hit(prompt: str, target: str) -> bool:
        return first_word(after[prompt]) == first_word(target)
    neighbours = [n for f in facts for n in f.neighbours]
    return {
        "efficacy": sum(hit(f.prompt, f.target_new) for f in facts) / len(facts),
        "generalization": sum(hit(f.paraphrase, f.target_new) for f in facts) / len(facts),
        "neighbours_kept": sum(first_word(before[n]) == first_word(after[n]) for n in neighbours) / max(1, len(neighbours)),
    }


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hparams", default=str(DEFAULT_HPARAMS), help="AlphaEdit hparams yaml")
    parser.add_argument("--device", default=None, help="override the hparams device (cpu, cuda, cuda:0)")
    parser.add_argument("--dtype", default=None, help="override the hparams dtype (float32, bfloat16, float16)")
    parser.add_argument("--edits", type=int, default=len(DEMO_FACTS), help="how many of the demo facts to apply")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        hparams = AlphaEditHyperParams.from_hparams(args.hparams)
        if args.device:
            hparams.device = args.device
        if args.dtype:
            hparams.dtype, hparams.fp16 = args.dtype, False
        hparams.validate()
        check_device(hparams.torch_device, "--device" if args.device else "device")
    except (ValueError, FileNotFoundError) as error:
        logger.error("%s", error)
        return 2
    facts = DEMO_FACTS[: args.edits]

    started = time.perf_counter()
    try:
        model, tok = load_smollm2(device=hparams.torch_device, dtype=torch_dtype(hparams.model_dtype),
                                  cache_dir=hparams.stats_dir)
    except ModelNotAvailableError as error:
        logger.error("%s", error)
        return 2
    logger.info("model ready in %.1f s", time.perf_counter() - started)
    started = time.perf_counter()
    state = create_state(model, tok, hparams)
    logger.info("statistics, projectors and context prefixes ready in %.1f s", time.perf_counter() - started)

    before = answers(model, tok, facts)
    for number, fact in enumerate(facts, 1):
        request = {"prompt": fact.prompt, "subject": fact.subject, "target_new": fact.target_new}
        apply_alphaedit_to_model(model, tok, [request], hparams, state=state)
        record = state.edit_log[-1]
        logger.info("edit %d/%d %r -> %r in %.1f s, target probability %.2f, preservation ‖ΔK0‖/‖WK0‖ max %.2e",
                    number, len(facts), fact.prompt, fact.target_new, record.seconds, record.target_probability[0],
                    max(record.preservation.values(), default=float("nan")))
    after = answers(model, tok, facts)
    print(render_table(facts, before, after))
    scores = summary(facts, after, before)
    print(f"\nafter {len(facts)} sequential edits: efficacy {scores['efficacy']:.0%}, "
          f"generalization {scores['generalization']:.0%}, neighbours unchanged {scores['neighbours_kept']:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
