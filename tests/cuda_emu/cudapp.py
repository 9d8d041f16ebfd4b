#!/usr/bin/env python3
"""cudapp.py - turns one kernels/ CUDA source into C++ that g++ compiles for the CPU emulator
(tests/cuda_emu/emu.h is force-included). Only two constructs are rewritten, everything else is
copied verbatim, line for line (a #line directive keeps errors and debug info on the original file):

  name<<<grid, block[, smem[, stream]]>>>(args)
      -> ::emu::launcher(name, "name", __FILE__, __LINE__, grid, block[, smem[, stream]])(args)
  __shared__ T name[dims];           (inside a function)
      -> per-block storage from ::emu::shared_var (fresh and poisoned for every block)
  extern __shared__ T name[];
      -> T *const name = (T *)::emu::dyn_shared();

Comments and string literals are skipped. A launch it cannot parse is an error (exit 1); a
__shared__ form it cannot rewrite is a warning (emu.h's fallback: one static per CPU thread).
Usage: cudapp.py IN OUT [--name NAME_FOR_#line]   (stdlib only)"""
import re
import sys


def code_mask(s):
    """mask[i] is True where s[i] is code (not in a comment, string or char literal)."""
    mask = [True] * len(s)
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if s.startswith('//', i):
            j = s.find('\n', i)
            j = n if j < 0 else j
            for k in range(i, j):
                mask[k] = False
            i = j
        elif s.startswith('/*', i):
            j = s.find('*/', i + 2)
            j = n if j < 0 else j + 2
            for k in range(i, j):
                mask[k] = False
            i = j
        elif c == '"' or (c == "'" and not (i > 0 and s[i - 1].isalnum())):
            j = i + 1
            while j < n and s[j] != c:
                j += 2 if s[j] == '\\' else 1
            j = min(j + 1, n)
            for k in range(i, j):
                mask[k] = False
            i = j
        else:
            i += 1
    return mask


class PPError(Exception):
    pass


def line_of(s, i):
    return s.count('\n', 0, i) + 1


def find_launches(s, mask):
    """[(start, end, replacement)] for every name<<<...>>> in code."""
    out = []
    pos = 0
    while True:
        p = s.find('<<<', pos)
        if p < 0:
            return out
        pos = p + 3
        if not mask[p]:
            continue
        # the kernel name, possibly with template arguments, backwards from <<<
        i = p - 1
        while i >= 0 and s[i].isspace():
            i -= 1
        if i >= 0 and s[i] == '>':
            depth = 0
            while i >= 0:
                if mask[i]:
                    if s[i] == '>':
                        depth += 1
                    elif s[i] == '<':
                        depth -= 1
                        if depth == 0:
                            break
                i -= 1
            i -= 1
            while i >= 0 and s[i].isspace():
                i -= 1
        j = i
        while j >= 0 and (s[j].isalnum() or s[j] in '_:'):
            j -= 1
        start = j + 1
        name = s[start:p].rstrip()
        if not re.match(r'^(::)?[A-Za-z_][\w:]*', name):
            raise PPError('line %d: cannot find the kernel name before <<<' % line_of(s, p))
        # the configuration up to the matching >>>
        k, depth = p + 3, 0
        while k < len(s):
            if mask[k]:
                if depth == 0 and s.startswith('>>>', k):
                    break
                if s[k] in '([{':
                    depth += 1
                elif s[k] in ')]}':
                    depth -= 1
                    if depth < 0:
                        raise PPError('line %d: unbalanced launch configuration' % line_of(s, p))
            k += 1
        if k >= len(s):
            raise PPError('line %d: <<< without >>>' % line_of(s, p))
        cfg = s[p + 3:k]
        if not cfg.strip():
            raise PPError('line %d: empty launch configuration' % line_of(s, p))
        rest = s[k + 3:].lstrip()
        if not rest.startswith('('):
            raise PPError('line %d: no argument list after >>>' % line_of(s, p))
        label = ' '.join(name.split()).replace('\\', '\\\\').replace('"', '\\"')
        rep = '::emu::launcher(%s, "%s", __FILE__, __LINE__, %s)' % (name, label, cfg)
        out.append((start, k + 3, rep))
        pos = k + 3


DECL = re.compile(r'^\s*(?P<type>.+?)\s*\b(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\[\]]*\]\s*)*)$', re.S)
ALIGN = re.compile(r'__align__\s*\(\s*([^()]*)\)')


def find_shared(s, mask, fname, warn):
    out = []
    depth = 0
    i, n = 0, len(s)
    while i < n:
        if not mask[i]:
            i += 1
            continue
        c = s[i]
        if c == '{':
            depth += 1
        elif c == '}':
            depth -= 1
        elif s.startswith('__shared__', i) and (i == 0 or not (s[i - 1].isalnum() or s[i - 1] == '_')) \
                and not (s[i + 10:i + 11].isalnum() or s[i + 10:i + 11] == '_'):
            semi = i
            while semi < n and not (mask[semi] and s[semi] == ';'):
                semi += 1
            decl = s[i + 10:semi]
            m = re.search(r'\bextern\s*$', s[max(0, i - 40):i])
            start = i - len(m.group(0)) if m else i
            nl = '\n' * s.count('\n', start, semi + 1)
            ln = line_of(s, i)
            if depth == 0 or ',' in decl or '=' in decl or '#' in s[start:semi] or semi >= n:
                warn('%s:%d: __shared__ declaration left to the static fallback' % (fname, ln))
                i += 10
                continue
            align = ALIGN.search(decl)
            decl_t = ALIGN.sub(' ', decl)
            d = DECL.match(decl_t)
            if not d:
                warn('%s:%d: cannot parse __shared__ declaration' % (fname, ln))
                i += 10
                continue
            ty, name, dims = ' '.join(d.group('type').split()), d.group('name'), ' '.join(d.group('dims').split())
            tn = 'emu_sh_%s_t' % name
            if m:
                if not dims.startswith('[') or dims.replace(' ', '') != '[]':
                    warn('%s:%d: extern __shared__ without [] left alone' % (fname, ln))
                    i += 10
                    continue
                rep = '%s *const %s = (%s *)::emu::dyn_shared();' % (ty, name, ty)
            else:
                al = 'alignof(%s)' % tn
                if align:
                    al = '(alignof(%s) > (%s) ? alignof(%s) : (%s))' % (tn, align.group(1), tn, align.group(1))
                key = '%s:%d:%s' % (fname, ln, name)
                key = key.replace('\\', '\\\\').replace('"', '\\"')
                rep = ('typedef %s %s%s; %s &%s = *(%s *)::emu::shared_var("%s", sizeof(%s), %s);'
                       % (ty, tn, dims, tn, name, tn, key, tn, al))
            out.append((start, semi + 1, rep + nl))
            i = semi + 1
            continue
        i += 1
    return out


def process(s, fname, warn):
    mask = code_mask(s)
    edits = find_launches(s, mask) + find_shared(s, mask, fname, warn)
    edits.sort()
    for a, b in zip(edits, edits[1:]):
        if a[1] > b[0]:
            raise PPError('overlapping rewrites near line %d' % line_of(s, b[0]))
    parts, last = [], 0
    for st, en, rep in edits:
        parts.append(s[last:st])
        parts.append(rep)
        last = en
    parts.append(s[last:])
    body = ''.join(parts)
    left = [m.start() for m in re.finditer('<<<', body) if code_mask(body)[m.start()]]
    if left:
        raise PPError('line %d: launch syntax left after rewriting' % line_of(body, left[0]))
    return '#line 1 "%s"\n' % fname.replace('\\', '\\\\').replace('"', '\\"') + body


def main(argv):
    args = argv[1:]
    name = None
    if '--name' in args:
        k = args.index('--name')
        name = args[k + 1]
        del args[k:k + 2]
    if len(args) != 2:
        sys.stderr.write(__doc__)
        return 2
    src, dst = args
    with open(src, encoding='utf-8') as f:
        s = f.read()
    fname = name or src

    def warn(msg):
        sys.stderr.write('cudapp: warning: %s\n' % msg)

    try:
        out = process(s, fname, warn)
    except PPError as e:
        sys.stderr.write('cudapp: %s: %s\n' % (fname, e))
        return 1
    with open(dst, 'w', encoding='utf-8') as f:
        f.write(out)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
