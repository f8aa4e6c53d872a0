"""Replace (or append) one generated section of a Markdown file.

    python3 scripts/docs_section.py NAME FILE < section.md

The section read from stdin goes between `<!-- NAME:begin -->` and
`<!-- NAME:end -->` in FILE, replacing what was there, or at the end of
FILE if it has no such markers yet. Used by the benchmark scripts that
write their results into docs/benchmarks.md.
"""

import sys


def main():
    name, path = sys.argv[1], sys.argv[2]
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = begin + "\n" + sys.stdin.read().strip("\n") + "\n" + end
    text = open(path).read()
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    open(path, "w").write(text)
    print(f"wrote the {name} section of {path}")


if __name__ == "__main__":
    main()
