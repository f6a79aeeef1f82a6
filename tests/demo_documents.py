"""The demos as the documents write them, one script for all three documents.

docs/lesson-plan.md is the source: each demo ("## 3. A node dies (6 min)") is a list of
fenced blocks, in the order a teacher types and looks.

    ```bash            commands typed in the commands terminal (terminal 1)
    ```bash log        a command started in another terminal, here the log's (it runs on)
    ```text            what the commands just typed printed
    ```text log        lines the log terminal shows, in this order, after the last commands
    ```text kubectl    the same for the terminal named kubectl

The word after the language names the terminal; GitHub shows only the language. README.md
shows the same demos: every command block, word for word, and expected blocks whose lines
are the plan's (some left out). docs/lesson-plan.fr.md has the same blocks, with the log's
lines in the original project's French (LOG_LANG=fr): tests/test_docs.py checks all three
against each other, and tests/e2e/test_lesson_demos.py plays the plan on the compose stack.

An expected line matches what came out when the words are the same, spaces aside, except
what changes from run to run: a clock time (TICK - 17:31:29), an age in a kubectl table
(5m12s), and the seconds of a grace-period countdown. "..." stands for lines left out.
"""

import re
from dataclasses import dataclass

DEMO_HEADING = re.compile(r"^#{2,3} (\d+)\. (.+?)(?: \(\d+ min\))?$")
SECTION = re.compile(r"^#{1,3} ")
FENCE_OPEN = re.compile(r"^```(\w*)(?: +(\S+))?\s*$")
CLOCK = re.compile(r"^\d\d:\d\d:\d\d$")
AGE = re.compile(r"^\d+[smhdy](\d+[smh])?$")
COUNTDOWN = ("eviction", "éviction")  # lines whose numbers are seconds counting down


@dataclass
class Block:
    """One fenced block of a demo."""
    kind: str      # "commands" or "expected"
    terminal: str  # "" for the commands terminal, else the name of another terminal ("log")
    text: str      # the block's lines, without the fences
    line: int      # where the block starts in its document (1-based), for error messages

    def lines(self):
        """The lines an expected block promises, in order ("..." and blank lines left out)."""
        return [line for line in self.text.splitlines() if line.strip() not in ("", "...", "…")]


def demos(markdown):
    """{number: (title, [Block])} for every numbered demo of a document, in its order."""
    found, current, block = {}, None, None
    for number, line in enumerate(markdown.splitlines(), start=1):
        if block is not None:  # inside a fence
            if line.startswith("```"):
                block.text = "\n".join(block.text)
                if current is not None:
                    current[1].append(block)
                block = None
            else:
                block.text.append(line)
            continue
        fence = FENCE_OPEN.match(line)
        if fence:
            language, terminal = fence.group(1), fence.group(2) or ""
            kind = {"bash": "commands", "text": "expected"}.get(language, "other")
            block = Block(kind, terminal, [], number)
            continue
        heading = DEMO_HEADING.match(line)
        if heading:
            current = (heading.group(2), [])
            found[int(heading.group(1))] = current
        elif SECTION.match(line) and current is not None:
            current = None  # a section that is not a demo ends the demo before it
    for title, blocks in found.values():
        blocks[:] = [each for each in blocks if each.kind != "other"]
    return found


def same_words(expected, actual):
    """True if a line that came out says what the document's line says (see the module doc)."""
    want, got = expected.split(), actual.split()
    if len(want) != len(got):
        return False
    countdown = any(word in expected for word in COUNTDOWN)
    for wanted, seen in zip(want, got):
        if wanted == seen:
            continue
        if CLOCK.match(wanted) and CLOCK.match(seen):
            continue
        if AGE.match(wanted) and AGE.match(seen):
            continue
        if countdown and wanted.isdigit() and seen.isdigit():
            continue
        return False
    return True


def find_in_order(expected_lines, actual_lines, start=0):
    """Where each expected line was found, in order, from actual_lines[start:]:
    (the index just after the last one found, the first line not found or None)."""
    at = start
    for expected in expected_lines:
        while at < len(actual_lines) and not same_words(expected, actual_lines[at]):
            at += 1
        if at == len(actual_lines):
            return at, expected
        at += 1
    return at, None
