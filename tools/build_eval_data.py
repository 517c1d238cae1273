"""Build the extra real instruction rows of tools/data from what Debian and PyPI packages ship.

    apt-get install -y python3.11-doc debian-faq
    pip download --no-deps chatterbot-corpus==1.3.3 -d /tmp/cbc && unzip -q /tmp/cbc/*.whl -d /tmp/cbc/x
    python tools/build_eval_data.py --chatterbot /tmp/cbc/x/chatterbot_corpus/data/english

writes `tools/data/python_faq.jsonl` (the questions of the Python FAQ, PSF licence),
`tools/data/debian_faq.jsonl` (the Debian FAQ, SPI's verbatim-copy licence) and
`tools/data/chatterbot_english_more.jsonl` (the chatterbot pairs that `chatterbot_english_qa.jsonl`
leaves out: later turns of a conversation, and answers of three to five words). Each row is one
question (`instruction`, empty `input`) with its answer (`output`): the answer's first paragraphs,
at most `--max-words` words, markup removed, code blocks left out. See tools/data/README.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

PYTHON_FAQ = Path("/usr/share/doc/python3.11/html/_sources/faq")
DEBIAN_FAQ = Path("/usr/share/doc/debian/FAQ/debian-faq.en.txt.gz")
OUT = Path(__file__).parent / "data"
UNDERLINE = re.compile(r"([-=~\"^*+#])\1{2,}")


def usable(answer: str) -> bool:
    """At least three words, and not a pointer to another entry."""
    return len(answer.split()) >= 3 and not answer.startswith(("See ", "Please see "))


def clip(paragraphs: list[str], max_words: int) -> str:
    """Whole paragraphs up to `max_words` words, ending before the first paragraph that introduces a
    listing (ends with a colon: the listing itself is left out); a first paragraph that is longer is
    cut at the last sentence end within the limit (or at the limit)."""
    kept: list[str] = []
    for para in paragraphs:
        if para.rstrip().endswith(":"):
            break
        words = para.split()
        used = sum(len(p.split()) for p in kept)
        if used + len(words) <= max_words:
            kept.append(" ".join(words))
        elif not kept:
            head = " ".join(words[:max_words])
            cut = max(head.rfind(". "), head.rfind("? "), head.rfind("! "))
            kept.append(head[:cut + 1] if cut > len(head) // 3 else head)
            break
        else:
            break
    return "\n\n".join(kept)


def plain_rst(text: str) -> str:
    text = re.sub(r":[a-z:]+:`~?([^`<]*?)\s*(?:<[^>]*>)?`", r"\1", text)  # :ref:`label <target>`, :func:`x`
    text = re.sub(r"`([^`<]+?)\s*<[^>]+>`_+", r"\1", text)  # `link text <url>`_
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"`([^`]+)`_*", r"\1", text)
    return text.replace("\\", "")


def python_faq(folder: Path, max_words: int) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*.rst.txt")):
        lines = path.read_text(encoding="utf-8").split("\n")
        titles = [i - 1 for i in range(1, len(lines))
                  if UNDERLINE.fullmatch(lines[i].strip()) and lines[i - 1].strip()
                  and not UNDERLINE.fullmatch(lines[i - 1].strip())]
        for n, start in enumerate(titles):
            question = lines[start].strip()
            if not question.endswith("?"):
                continue
            end = titles[n + 1] if n + 1 < len(titles) else len(lines)
            paragraphs, para, in_code = [], [], False
            for line in lines[start + 2:end] + [""]:
                if not line.strip():
                    if para:
                        paragraphs.append(" ".join(para))
                        in_code = para[-1].endswith("::")
                    para = []
                    continue
                if line.startswith((" ", "\t", "..")) or in_code and line.startswith(" "):
                    continue  # code blocks, directives and their bodies
                in_code = False
                para.append(line.strip())
            paragraphs = [plain_rst(p).replace("::", ":") for p in paragraphs if not p.startswith("..")]
            answer = clip([p for p in paragraphs if p.strip()], max_words)
            if usable(answer):
                rows.append({"id": f"python_faq_{path.name.split('.')[0]}_{n}", "instruction": question,
                             "input": "", "output": answer, "source": f"python3.11-doc/faq/{path.name}"})
    return rows


def debian_faq(path: Path, max_words: int) -> list[dict]:
    lines = gzip.open(path, "rt", encoding="utf-8").read().replace("\u00a0", " ").split("\n")
    heading = re.compile(r"^(\d+\.\d+(?:\.\d+)?)\. (.+)$")
    starts = [i for i, line in enumerate(lines) if heading.match(line)]
    rows = []
    for n, start in enumerate(starts):
        number, question = heading.match(lines[start]).groups()
        j = start + 1
        while j < len(lines) and lines[j].strip() and not lines[j].startswith(" "):
            question += " " + lines[j].strip()  # a heading continued on the next lines
            j += 1
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        paragraphs, para = [], []
        for line in lines[j:end] + [""]:
            if not line.strip():
                if para:
                    paragraphs.append(" ".join(para))
                para = []
            elif line.startswith("    ") and not line.startswith("      "):
                para.append(line.strip())  # body text; deeper indents are lists and listings
        paragraphs = [re.sub(r"\s*\(https?://[^)]*\)", "", p) for p in paragraphs]
        answer = clip(paragraphs, max_words)
        if question.rstrip("!").endswith("?") and usable(answer):
            rows.append({"id": f"debian_faq_{number}", "instruction": question.strip(), "input": "",
                         "output": answer, "source": f"debian-faq/{number}"})
    return rows


def chatterbot_more(folder: Path, shipped: Path) -> list[dict]:
    """The pairs the shipped chatterbot file leaves out: later turns, and answers of 3 to 5 words."""
    import yaml

    seen = {json.loads(line)["instruction"].lower() for line in shipped.open(encoding="utf-8")}
    rows = []
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        for j, conv in enumerate(data.get("conversations") or []):
            for t in range(len(conv) - 1):
                if not (isinstance(conv[t], str) and isinstance(conv[t + 1], str)):
                    continue
                question, answer = conv[t].strip(), conv[t + 1].strip()
                if question.lower() in seen or len(answer.split()) < 3:
                    continue
                seen.add(question.lower())
                rows.append({"id": f"chatterbot_{path.stem}_{j}_{t}", "instruction": question, "input": "",
                             "output": answer, "source": f"chatterbot-corpus-1.3.3/english/{path.stem}"})
    return rows


def write(rows: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{path}: {len(rows)} rows")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chatterbot", type=Path, help="the corpus' data/english folder")
    p.add_argument("--max-words", type=int, default=80, help="longest answer kept, in words")
    args = p.parse_args()
    write(python_faq(PYTHON_FAQ, args.max_words), OUT / "python_faq.jsonl")
    write(debian_faq(DEBIAN_FAQ, args.max_words), OUT / "debian_faq.jsonl")
    if args.chatterbot:
        write(chatterbot_more(args.chatterbot, OUT / "chatterbot_english_qa.jsonl"),
              OUT / "chatterbot_english_more.jsonl")


if __name__ == "__main__":
    main()
