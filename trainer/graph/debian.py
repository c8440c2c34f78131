"""The Debian package index as a text-attributed graph (../shared/assets.md §6.2), offline.

Nodes are binary packages; node text is the description (synopsis + long description, from a
``Translation-en`` file when given) with the package's own name removed (names leak the section);
labels are sections (component prefix such as ``contrib/`` stripped); edges are Depends (+ Pre-Depends)
and Recommends, with ``|`` alternatives as several edges, version constraints and ``:arch`` qualifiers
dropped, virtual names resolved through Provides, self-loops dropped. The source graph is the subgraph
induced by the source sections, each target graph by its own sections; so label sets are disjoint and
no edge joins two graphs.

Input: ``apt-cache dumpavail`` output (RFC-822 records, blank-line separated); ``None`` runs it.
"""
from __future__ import annotations

import re
import subprocess
from collections import defaultdict
from pathlib import Path

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.graph.tag import Tag

# Label texts (zero-shot prompts): what the packages of a section are, in our words.
SECTION_TEXTS = {
    "admin": "system administration utilities",
    "cli-mono": "software for the Mono and .NET common language infrastructure",
    "comm": "communication programs for modems, faxes and serial devices",
    "database": "database servers and clients",
    "debug": "debugging symbols",
    "devel": "software development tools, compilers and build systems",
    "doc": "documentation and manuals",
    "editors": "text editors and word processors",
    "education": "educational software",
    "electronics": "electronics design and circuit simulation",
    "embedded": "software for embedded devices",
    "fonts": "fonts and font tools",
    "games": "games and entertainment programs",
    "gnome": "the GNOME desktop environment",
    "gnu-r": "the R statistical language and its packages",
    "gnustep": "the GNUstep environment",
    "golang": "Go programming language libraries",
    "graphics": "graphics, image viewing and image editing programs",
    "hamradio": "amateur radio software",
    "haskell": "Haskell programming language libraries",
    "httpd": "web servers and their modules",
    "interpreters": "interpreters for programming and scripting languages",
    "introspection": "GObject introspection data",
    "java": "Java programming language libraries",
    "javascript": "JavaScript libraries and Node.js modules",
    "kde": "the KDE desktop environment",
    "kernel": "operating system kernels and kernel modules",
    "libdevel": "development files for libraries",
    "libs": "shared libraries",
    "lisp": "Lisp programming language software",
    "localization": "language packs and localization files",
    "mail": "email clients, servers and filters",
    "math": "mathematics software",
    "metapackages": "metapackages that install groups of packages",
    "misc": "miscellaneous software",
    "net": "networking daemons and network tools",
    "news": "Usenet news servers and readers",
    "ocaml": "OCaml programming language software",
    "oldlibs": "obsolete libraries",
    "otherosfs": "emulators and tools for other operating systems and file systems",
    "perl": "Perl programming language modules",
    "php": "PHP programming language software",
    "python": "Python programming language modules",
    "ruby": "Ruby programming language libraries",
    "rust": "Rust programming language crates",
    "science": "scientific software",
    "shells": "command shells",
    "sound": "audio players, recorders and sound tools",
    "tasks": "packages that set up a system for a task",
    "tex": "the TeX typesetting system",
    "text": "text processing utilities",
    "utils": "general utilities",
    "vcs": "version control systems",
    "video": "video players, editors and codecs",
    "web": "web browsers and web tools",
    "x11": "the X window system and its programs",
    "xfce": "the Xfce desktop environment",
    "zope": "the Zope and Plone web platform",
}

_DEP = re.compile(r"^\s*([^\s(:\[]+)")


def parse_records(text: str) -> list[dict[str, str]]:
    """RFC-822 records (continuation lines joined with newlines)."""
    records, current, key = [], {}, None
    for line in text.splitlines():
        if not line.strip():
            if current:
                records.append(current)
            current, key = {}, None
        elif line[0] in " \t" and key is not None:
            current[key] += "\n" + (line.strip() if line.strip() != "." else "")
        elif ":" in line:
            key, _, value = line.partition(":")
            current[key] = value.strip()
    if current:
        records.append(current)
    return records


def dependency_names(field: str) -> list[str]:
    """Package names of a Depends-like field: alternatives expanded, versions and qualifiers dropped."""
    names = []
    for group in field.split(","):
        for alt in group.split("|"):
            m = _DEP.match(alt)
            if m:
                names.append(m.group(1))
    return names


def strip_name(text: str, name: str) -> str:
    """``text`` without the package ``name`` (whole-word, case-insensitive)."""
    if name.lower() not in text.lower():
        return text.strip()
    return re.sub(r"\s+", " ", re.sub(rf"(?<![\w.+-]){re.escape(name)}(?![\w+-])", " ", text, flags=re.I)).strip()


def section_of(record: dict[str, str]) -> str:
    """The record's section without a component prefix (``contrib/net`` -> ``net``)."""
    return record.get("Section", "").rsplit("/", 1)[-1]


def read_packages(packages: str | None, translations: str | None = None) -> list[dict[str, str]]:
    """Records of a dumpavail file (``None``: ``apt-cache dumpavail``), long descriptions merged in."""
    if packages is None:
        try:
            text = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            raise UserError(f"cannot run `apt-cache dumpavail` ({e}); pass a saved file as data.debian_packages")
    else:
        text = Path(packages).expanduser().read_text(encoding="utf-8", errors="replace")
    records = [r for r in parse_records(text) if "Package" in r]
    if translations is not None:
        long = {r["Description-md5"]: r.get("Description-en", "") for r in
                parse_records(Path(translations).expanduser().read_text(encoding="utf-8", errors="replace"))
                if "Description-md5" in r}
        for r in records:
            if r.get("Description-md5") in long:
                r["Description"] = long[r["Description-md5"]]
    return records


def debian_tags(records: list[dict[str, str]], source_sections: list[str], target_sections: list[list[str]],
                edge_fields: list[str], label_texts: dict[str, str] | None = None) -> tuple[Tag, list[Tag]]:
    """(source, targets) from package records: one target graph per list in ``target_sections``.
    ``source_sections == ["*"]`` takes every section of the records that no target lists (the whole index)."""
    texts_of = {**SECTION_TEXTS, **(label_texts or {})}
    if list(source_sections) == ["*"]:
        taken = {s for g in target_sections for s in g}
        source_sections = sorted({section_of(r) for r in records} - taken - {""})
    groups = [source_sections, *target_sections]
    used = [s for g in groups for s in g]
    if len(set(used)) != len(used):
        raise UserError("a Debian section is listed twice across data.debian_source_sections and "
                        "data.debian_target_sections: source and target label sets must be disjoint")
    missing = [s for s in used if s not in texts_of]
    if missing:
        raise UserError(f"Debian section '{missing[0]}' has no label text; add it to data.debian_label_texts")
    group_of = {s: i for i, g in enumerate(groups) for s in g}
    nodes: dict[str, dict] = {}
    for r in records:
        section = section_of(r)
        text = strip_name(r.get("Description", ""), r["Package"])
        if section in group_of and text and r["Package"] not in nodes:
            nodes[r["Package"]] = {"section": section, "text": text, "record": r}
    providers = defaultdict(set)
    for name, node in nodes.items():
        for virtual in dependency_names(node["record"].get("Provides", "")):
            providers[virtual].add(name)
    tags = []
    for i, sections in enumerate(groups):
        members = sorted(n for n, node in nodes.items() if group_of[node["section"]] == i)
        position = {n: k for k, n in enumerate(members)}
        edges = set()
        for n in members:
            for field in edge_fields:
                for dep in dependency_names(nodes[n]["record"].get(field, "")):
                    for target in ({dep} if dep in nodes else providers.get(dep, set())):
                        if target in position and target != n:
                            edges.add((position[n], position[target]))
        present = [s for s in sections if any(nodes[n]["section"] == s for n in members)]
        name = "source" if i == 0 else f"target{i}"
        if len(present) < 2:
            raise UserError(f"Debian graph '{name}' has packages from {len(present)} of its sections "
                            f"({', '.join(sections)}): it needs at least 2 classes")
        tags.append(Tag(name, members, [nodes[n]["text"] for n in members], [nodes[n]["section"] for n in members],
                        sorted(edges), {s: texts_of[s] for s in present}, "source" if i == 0 else "target",
                        {"builder": "debian", "sections": present, "edge_fields": list(edge_fields)}))
    return tags[0], tags[1:]
