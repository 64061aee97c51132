#!/usr/bin/env python3
"""Writes a man(7) page from guard's Markdown docs, so the page and Docs/ never disagree.

    md2man.py SOURCE.md NAME SECTION "SUMMARY" [--section "## Heading"] [--see-also "guard(8), ..."]

It knows the Markdown Docs/ uses: headings, paragraphs, `code`, **bold**, *emphasis*,
links, fenced code blocks, tables (each row becomes a tagged paragraph), lists and HTML
comments (dropped). With --section, only that heading's part of SOURCE (up to the next
heading of its level) is used, and its title becomes DESCRIPTION.
"""
import argparse
import re
import sys


def escape(text):
    """Roff escapes for running text: backslashes, and a dot or quote at a line's start."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return text


def inline(text):
    """Markdown inline markup to roff fonts."""
    out = []
    # `code` first: its content is literal.
    for i, part in enumerate(re.split(r"`([^`]*)`", text)):
        if i % 2 == 1:
            out.append("\\fB" + escape(part) + "\\fR")
            continue
        part = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", part)
        part = escape(part)
        part = re.sub(r"\*\*([^*]+)\*\*", r"\\fB\1\\fR", part)
        part = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"\\fI\1\\fR", part)
        out.append(part)
    return "".join(out)


def line_safe(text):
    """A roff text line must not start with a dot or a quote."""
    return "\\&" + text if text[:1] in (".", "'") else text


def cells(row):
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def convert(lines, name, section, summary, title_as_description):
    out = [
        f'.TH {name.upper()} {section} "" "guard" "guard manual"',
        ".ad l",  # ragged right: long paths and commands need no stretched lines
        ".SH NAME",
        f"{escape(name)} \\- {escape(summary)}",
    ]
    paragraph = []

    def flush():
        if paragraph:
            out.append(line_safe(inline(" ".join(paragraph))))
            paragraph.clear()

    i = 0
    in_comment = False
    while i < len(lines):
        line = lines[i].rstrip("\n")
        stripped = line.strip()
        if in_comment or stripped.startswith("<!--"):
            in_comment = "-->" not in stripped
            i += 1
            continue
        if stripped.startswith("```"):
            flush()
            out.append(".PP")
            out.append(".nf")
            out.append(".RS 4")
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                out.append(line_safe(escape(lines[i].rstrip("\n"))))
                i += 1
            out.append(".RE")
            out.append(".fi")
            i += 1
            continue
        heading = re.match(r"^(#+)\s+(.*)$", line)
        if heading:
            flush()
            level, text = len(heading.group(1)), heading.group(2)
            if level == 1 or (title_as_description and i == 0):
                out.append(".SH DESCRIPTION")
            elif level == 2:
                out.append(".SH " + escape(text.upper()))
            else:
                out.append(".SS " + escape(text))
            i += 1
            continue
        if stripped.startswith("|"):
            flush()
            header = cells(stripped)
            i += 1
            if i < len(lines) and re.match(r"^\|[\s:|-]+\|?$", lines[i].strip()):
                i += 1
            while i < len(lines) and lines[i].strip().startswith("|"):
                row = cells(lines[i])
                out.append(".TP")
                out.append(line_safe(inline(row[0])))
                rest = []
                for label, cell in zip(header[1:], row[1:]):
                    if len(header) > 2 and label.lower() not in ("meaning", "what"):
                        rest.append(f"{label}: {cell}.")
                    else:
                        rest.append(cell)
                out.append(line_safe(inline(" ".join(rest))))
                i += 1
            out.append(".PP")
            continue
        item = re.match(r"^(\s*)([-*]|\d+\.)\s+(.*)$", line)
        if item:
            flush()
            marker = "\\(bu" if item.group(2) in "-*" else item.group(2)
            text = [item.group(3)]
            i += 1
            while i < len(lines) and lines[i].startswith("  ") and lines[i].strip() and not re.match(r"^\s*([-*]|\d+\.)\s", lines[i]):
                text.append(lines[i].strip())
                i += 1
            out.append(f".IP {marker} 4")
            out.append(line_safe(inline(" ".join(text))))
            continue
        if not stripped:
            flush()
            if out[-1] not in (".PP",) and not out[-1].startswith(".SH") and not out[-1].startswith(".SS"):
                out.append(".PP")
            i += 1
            continue
        paragraph.append(stripped)
        i += 1
    flush()
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("name")
    parser.add_argument("section")
    parser.add_argument("summary")
    parser.add_argument("--section", dest="part")
    parser.add_argument("--see-also", default="")
    args = parser.parse_args()
    lines = open(args.source, encoding="utf-8").read().split("\n")
    if args.part:
        level = len(args.part) - len(args.part.lstrip("#"))
        start = next(i for i, line in enumerate(lines) if line.strip() == args.part)
        end = next((i for i in range(start + 1, len(lines)) if re.match(r"^#{1,%d}\s" % level, lines[i])), len(lines))
        lines = lines[start:end]
    out = convert(lines, args.name, args.section, args.summary, bool(args.part))
    while out and out[-1] == ".PP":
        out.pop()
    if args.see_also:
        out.append(".SH SEE ALSO")
        refs = [ref.strip() for ref in args.see_also.split(",")]
        for index, ref in enumerate(refs):
            page, sect = re.match(r"(.*)\((\d)\)", ref).groups()
            out.append(f".BR {escape(page)} ({sect}){',' if index < len(refs) - 1 else ''}")
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
