#!/usr/bin/env python3
"""Prints a Go string constant of kind's node-image builder, evaluated.

kind writes its default CNI and storage manifests into the node image from
constants in sigs.k8s.io/kind/pkg/build/nodeimage (const_cni.go,
const_storage.go), built from raw strings and other constants joined by `+`.
Reading them from the pinned module keeps our node image in step with the
kind binary that uses it. Also lists the images those manifests name.

  kind-manifests.py DIR NAME     the constant NAME, e.g. defaultCNIManifest
  kind-manifests.py DIR --images every `...Image` constant's value, one a line
"""
import pathlib
import re
import sys

TOKEN = re.compile(r'\s*(?:`([^`]*)`|"((?:[^"\\]|\\.)*)"|([A-Za-z_][A-Za-z0-9_]*))\s*(\+)?', re.S)


def constants(src: str) -> dict:
    """name -> value for every `const name = <expr>` whose parts we know."""
    out: dict = {}
    for m in re.finditer(r'^const\s+([A-Za-z_][A-Za-z0-9_]*)\s*=', src, re.M):
        pos, parts = m.end(), []
        while True:
            t = TOKEN.match(src, pos)
            if not t:
                break
            raw, quoted, ident, plus = t.groups()
            if raw is not None:
                parts.append(raw)
            elif quoted is not None:
                parts.append(bytes(quoted, "utf-8").decode("unicode_escape"))
            elif ident in out:
                parts.append(out[ident])
            else:
                raise SystemExit(f"unknown constant {ident} in {m.group(1)}")
            pos = t.end()
            if not plus:
                break
        out[m.group(1)] = "".join(parts)
    return out


def main() -> None:
    pkg = pathlib.Path(sys.argv[1]) / "pkg/build/nodeimage"
    consts: dict = {}
    for f in sorted(pkg.glob("const*.go")):
        consts.update(constants(f.read_text()))
    if sys.argv[2] == "--images":
        for name, value in sorted(consts.items()):
            if name.endswith("Image"):
                print(value)
        return
    sys.stdout.write(consts[sys.argv[2]])


if __name__ == "__main__":
    main()
