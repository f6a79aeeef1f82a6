"""The documents: their links resolve, and the demos are one script in three documents.

docs/lesson-plan.md is the source of the demos (tests/e2e/test_lesson_demos.py plays it on
the compose stack); README.md shows the same demos, and docs/lesson-plan.fr.md the same in
French. These tests need no network and no Docker: they read the files.
"""
import re
import string
from pathlib import Path

import pytest

import machinery
from demo_documents import demos, find_in_order, same_words

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PLAN = REPO / "docs" / "lesson-plan.md"
PLAN_FR = REPO / "docs" / "lesson-plan.fr.md"
README = REPO / "README.md"

LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6}) +(.+?) *$", re.M)


def without_code_fences(markdown):
    """The text outside fenced code blocks (a "# comment" there is no heading)."""
    return re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)


def without_code(markdown):
    """The text outside fenced and inline code, where a link is a link."""
    return re.sub(r"`[^`\n]*`", "", without_code_fences(markdown))


def anchors(markdown):
    """The anchors GitHub makes for a document's headings (lowercase, punctuation out, '-')."""
    found, seen = set(), {}
    for _, title in HEADING.findall(without_code_fences(markdown)):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower().replace("`", "")).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(document):
    """(target, anchor) of every link of a document that stays inside the repository."""
    for match in LINK.finditer(without_code(document.read_text(encoding="utf-8"))):
        target = match.group(1) or match.group(2)
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        yield path, anchor


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_link_within_the_repository_resolves(document):
    broken = []
    for path, anchor in relative_links(document):
        target = (document.parent / path).resolve() if path else document
        if not target.exists():
            broken.append(f"{path}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target.read_text(encoding="utf-8")):
            broken.append(f"{path}#{anchor}: no such heading in {target.name}")
    assert broken == [], f"{document.name}: " + "; ".join(broken)


def test_the_links_test_finds_a_broken_link_and_a_missing_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A section: here\n\n[ok](#a-section-here) [no](#nope) "
                    "[gone](missing.md) `[code](ignored.md)`\n", encoding="utf-8")
    assert list(relative_links(page)) == [("", "a-section-here"), ("", "nope"), ("missing.md", "")]
    assert "a-section-here" in anchors(page.read_text()) and "nope" not in anchors(page.read_text())


def test_the_readme_is_read_in_five_minutes_and_its_first_demo_comes_early():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines"
    first_demo = next(number for number, line in enumerate(lines, start=1)
                      if re.match(r"^#{2,3} 1\. ", line))
    assert first_demo <= 100, f"demo 1 starts at line {first_demo}"


def test_the_lesson_is_read_in_one_sitting_and_the_machinery_never_imports_it():
    """app_controller.py is the textbook: at most 500 lines, the loop in its first 100; the
    modules beside it import nothing from it, so the arrows point one way."""
    lines = (REPO / "app_controller.py").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 500, f"app_controller.py has {len(lines)} lines"
    loop = next(number for number, line in enumerate(lines, start=1)
                if line.strip() == "while True:" and line.startswith("    "))
    assert loop <= 100, f"the control loop's while True is at line {loop}"
    for module in ("machinery.py", "kubernetes_api.py"):
        text = (REPO / module).read_text(encoding="utf-8")
        assert not re.search(r"^\s*(import|from)\s+app_controller\b", text, re.M), module


# --- one script for the demos ------------------------------------------------------------

def test_the_plan_has_every_demo_with_commands_and_what_they_show():
    plan = demos(PLAN.read_text(encoding="utf-8"))
    assert sorted(plan) == list(range(len(plan))) and len(plan) >= 8, sorted(plan)
    for number, (title, blocks) in plan.items():
        kinds = {block.kind for block in blocks}
        assert kinds == {"commands", "expected"}, f"demo {number} ({title}): {kinds}"


def test_the_readme_plays_the_plans_demos_word_for_word():
    """Every commands block of every demo of the plan is in the README, in the same order;
    each expected block of the README is one of the plan's, lines left out at most."""
    plan = demos(PLAN.read_text(encoding="utf-8"))
    readme = demos(README.read_text(encoding="utf-8"))
    assert sorted(readme) == sorted(plan) or sorted(readme) == sorted(plan)[1:], \
        f"README demos {sorted(readme)}, plan demos {sorted(plan)}"
    for number, (title, blocks) in readme.items():
        plan_title, plan_blocks = plan[number]
        assert title == plan_title, f"demo {number}: README {title!r}, plan {plan_title!r}"
        assert [b.text for b in blocks if b.kind == "commands"] == \
               [b.text for b in plan_blocks if b.kind == "commands"], f"demo {number}: commands differ"
        at = 0
        for block in blocks:
            while at < len(plan_blocks) and not shows_part_of(block, plan_blocks[at]):
                at += 1
            assert at < len(plan_blocks), (f"README demo {number}, block at line {block.line}: "
                                           f"not in the plan's demo {number}, in this order")
            at += 1


def shows_part_of(block, plan_block):
    """True if a README block is this plan block, or (an expected block) some of its lines."""
    if (block.kind, block.terminal) != (plan_block.kind, plan_block.terminal):
        return False
    if block.kind == "commands":
        return block.text == plan_block.text
    return find_in_order(block.lines(), plan_block.lines())[1] is None


def log_templates(language):
    """[(key, regex)] for each line of the tick log, from machinery.MESSAGES."""
    templates = []
    for key, template in machinery.MESSAGES[language].items():
        if not isinstance(template, str):
            continue
        pattern = ""
        for literal, field, _, _ in string.Formatter().parse(template.strip()):
            pattern += re.escape(literal)
            if field is not None:
                pattern += f"(?P<{field}>.+?)"
        templates.append((key, re.compile(pattern + "$"), len(re.sub(r"\{[^}]*\}", "", template))))
    # The most words first: "TICK - {time} (woken by an API change)" before "TICK - {time}".
    return [(key, pattern) for key, pattern, _ in sorted(templates, key=lambda t: -t[2])]


ENGLISH, FRENCH = machinery.TickLog("en"), machinery.TickLog("fr")
COUNT = re.compile(r"^([\d,]+) (containers?|nodes?)$")


def in_french(line):
    """The French log's line for an English one (the same values, the original project's words)."""
    stripped = line.strip()
    for key, pattern in log_templates("en"):
        match = pattern.fullmatch(stripped)
        if match and key not in ("more", "more_unread"):
            values = {}
            for field, value in match.groupdict().items():
                count = COUNT.match(value)
                if count:
                    value = FRENCH.count(int(count.group(1).replace(",", "")), count.group(2).rstrip("s"))
                else:
                    value = in_french(value)  # a line inside a line: the waiting verdict's nodes
                values[field] = value
            template = machinery.MESSAGES["fr"][key].strip()
            return line[:len(line) - len(line.lstrip())] + re.sub(
                r"\{(\w+)[^}]*\}", lambda field: values[field.group(1)], template)
    return line


def test_the_french_plan_is_the_same_script_in_the_original_projects_words():
    plan = demos(PLAN.read_text(encoding="utf-8"))
    french = demos(PLAN_FR.read_text(encoding="utf-8"))
    assert sorted(french) == sorted(plan)
    for number, (_, blocks) in plan.items():
        french_blocks = french[number][1]
        assert [(b.kind, b.terminal) for b in french_blocks] == [(b.kind, b.terminal) for b in blocks], \
            f"demo {number}: not the same blocks"
        for english, translated in zip(blocks, french_blocks):
            if english.kind == "commands":
                assert translated.text == english.text, f"demo {number}, line {translated.line}"
                continue
            wanted = [in_french(line) if english.terminal == "log" else line for line in english.lines()]
            got = translated.lines()
            assert len(got) == len(wanted) and all(map(same_words, wanted, got)), (
                f"lesson-plan.fr.md demo {number}, block at line {translated.line}:\n"
                + "\n".join(f"  want {w!r}\n  got  {g!r}" for w, g in zip(wanted, got) if not same_words(w, g))
                + (f"\n  {len(wanted)} lines wanted, {len(got)} found" if len(got) != len(wanted) else ""))


def test_the_translation_of_a_log_line_is_the_french_log():
    assert in_french("   → 1 container running on 3 nodes") == "   → 1 containers tournent sur 3 noeuds"
    assert in_french("  ▶ START: app1 on node-2") == "  ▶ START: app1 sur node-2"
    assert in_french("✅ Converged") == "✅ Convergé"
    assert in_french("TICK - 21:43:40 (woken by an API change)") == "TICK - 21:43:40 (réveillé par l'API)"
    assert in_french('{"name": "nginx"}') == '{"name": "nginx"}', "not a log line: as it is"
    assert in_french("⏳ Waiting: node-2 silent, what it runs is unknown (eviction in 22 s)") == \
        "⏳ En attente : node-2 silencieux, ce qu'il exécute est inconnu (éviction dans 22 s)"
