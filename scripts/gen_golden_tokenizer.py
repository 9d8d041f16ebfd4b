#!/usr/bin/env python3
"""gen_golden_tokenizer.py - writes tests/golden/tokenizer/smollm2.jsonl: hard strings with the
token ids that Hugging Face `tokenizers` (configured as SmolLM2's tokenizer.json, built from the
GGUF by gguf_tokenizer.py) produces. Reference data only; never reads hydrad output.

Each line: {"text", "ids" (special-token text tokenised as plain text), "ids_special" (control
tokens parsed), "decoded" (decode(ids, skip_special_tokens=False))}.

"Without special parsing" = tokenizers' `encode_special_tokens = True` (split_special_tokens).
It is cross-checked here against a second tokenizer in which the control tokens are not
registered as added tokens at all; the two must agree on every string or the script fails.

Usage: .venv/bin/python scripts/gen_golden_tokenizer.py [model.gguf] [out.jsonl]
       <python with llama-cpp-python> scripts/gen_golden_tokenizer.py --xcheck-llama [model] [jsonl]
The second form only reads an existing jsonl and compares it with llama.cpp's tokenizer
(llama-cpp-python, not in tests/requirements.txt; it needs only the stdlib besides).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DEFAULT_MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_OUT = os.path.join(ROOT, "tests", "golden", "tokenizer", "smollm2.jsonl")

PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog, but in 2024 the dog - who'd had enough - "
    "finally jumped back!  It wasn't easy: 3.14159 metres, 1,234,567 spectators and 42% "
    "humidity made the leap (as reported on https://example.org/fox?dog=1&leap=true) quite "
    "remarkable. Meanwhile, in Tōkyō, 東京の人々は驚いた。 Les habitants de Montréal étaient "
    "ébahis; die Münchner sagten \"Donnerwetter!\"; в Москве сказали «ничего себе». "
    "\tIndented line with a tab,\n\nthen a blank line, then\r\nWindows line endings.\n"
    "Code: `for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }` and Python: "
    "`def f(x): return x ** 2 if x > 0 else -x`. Emoji: 🦊🐕 👩‍💻 👍🏽 🇫🇷. "
    "Numbers like 0x7FFF_FFFF, 1e-9, -0.0 and 1_000_000 appear too. "
    "She said: \"I'm sure they'll say we've done it, and you'd agree it's ours.\" "
    "SHE SAID: \"I'M SURE THEY'LL SAY WE'VE DONE IT, AND YOU'D AGREE IT'S OURS.\" "
)


def paragraph_2k() -> str:
    s = PARAGRAPH
    while len(s.encode("utf-8")) < 2048:
        s += PARAGRAPH
    # Cut at a character boundary near 2 KB.
    b = s.encode("utf-8")[:2100]
    return b.decode("utf-8", errors="ignore")


def hard_strings() -> list:
    s = []
    # Empty, single chars, whitespace.
    s += ["", " ", "  ", "   ", "\t", "\n", "\r\n", "\r", "\n\n", "\n\n\n", " \n", "\n ",
          "\t\t\tx", "a\tb", "a  b", "a   b", "a    b", "a\n\nb", "a\r\nb\r\nc", " \t \n ",
          "  leading", "trailing  ", "  both  ", " x", "x ", "word\n", "\nword",
          "                                                  x", "x" + " " * 17,
          "\u00a0nbsp\u00a0", "\u2003em space\u2003", "\u3000ideographic space", "\v\f",
          "line1\nline2\n\n  indented\n\t\ttabbed"]
    # ASCII basics.
    s += ["Hello", "hello world", "Hello, world!", "HELLO WORLD", "hElLo WoRlD", "a", "A",
          "!", "?!", "...", "…", "--", "---", "a-b_c.d", "foo@bar.com", "@user #tag $5 %d ^&*",
          "(parens) [brackets] {braces} <angles>", "\"quoted\" 'single'", "back`tick`",
          "~tilde~ |pipe| \\backslash\\", "semicolon; colon: comma, period."]
    # Contractions, upper-case variants.
    for c in ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]:
        s.append("it" + c)
        s.append("IT" + c.upper())
    s += ["He's here, she'd go, we'll see, they're sure, I've done, I'm fine, don't.",
          "HE'S HERE, SHE'D GO, WE'LL SEE, THEY'RE SURE, I'VE DONE, I'M FINE, DON'T.",
          "He'S We'Ll They'Re", "'s 't 're 've 'm 'll 'd", "''", "'", "rock 'n' roll",
          "o'clock", "y'all'd've", "James' book", "’s curly apostrophe don’t", "it''s",
          " 's", "'S", "x'sy"]
    # Digits.
    s += ["0", "7", "12", "123", "1234", "12345678901234567890", "9" * 64,
          "3.14159", "-42", "+1", "1,000", "1,234,567.89", "1.234.567,89", "1 000 000",
          "1_000_000", "1'000'000", "0x1F", "0xDEADBEEF", "1e10", "6.022e23", "2024-06-30",
          "12:34:56", "192.168.0.1", "v1.2.3", "abc123def", "123abc", "a1b2c3", "1st 2nd 3rd 4th",
          "١٢٣٤٥", "१२३४", "１２３", "½ ¾ ⅓", "²³¹", "Ⅻ", "phone: +1 (555) 123-4567",
          "$1,299.99", "€5", "£10.50", "¥1000", "100%", "3/4", "1/2/3", "10^9", "-0.0"]
    # Latin with diacritics, combining marks.
    s += ["café", "naïve résumé", "Ångström", "Crème brûlée", "façade", "Straße", "STRASSE",
          "Ægir Øresund", "Łódź", "İstanbul", "ıi", "ǅ ǈ ǋ",
          "cafe\u0301", "e\u0301\u0302\u0303", "a\u0300\u0301\u0302\u0303\u0304\u0305",
          "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f\u031e\u0320\u034dA\u036b\u0357",
          "\u0301", "n\u0303", "\u00f1 vs n\u0303", "Ã©", "Ã¼ber"]
    # Greek, Cyrillic, Armenian, Georgian.
    s += ["Ελληνικά γράμματα", "Привет, мир!", "ПРИВЕТ", "Ёжик в тумане", "Україна",
          "Հայերեն", "ქართული", "Ω ω µ μ"]
    # Arabic, Hebrew, RTL mixes.
    s += ["مرحبا بالعالم", "العربية ١٢٣", "السَّلَامُ عَلَيْكُمْ", "שלום עולם", "עִבְרִית",
          "English مع العربية mixed", "\u202eRTL override\u202c", "\u200fRLM\u200e LRM",
          "فارسی ۱۲۳", "اردو"]
    # Indic, SE Asian.
    s += ["नमस्ते दुनिया", "हिन्दी", "ক্ষ", "தமிழ்", "తెలుగు", "ಕನ್ನಡ", "മലയാളം", "ਪੰਜਾਬੀ",
          "ภาษาไทย", "ສະບາຍດີ", "ខ្មែរ", "မြန်မာ", "Tiếng Việt", "සිංහල", "བོད་ཡིག"]
    # CJK.
    s += ["你好，世界", "中文字符测试", "繁體中文", "日本語のテキスト", "ひらがな カタカナ",
          "ｶﾀｶﾅ 半角", "한국어 텍스트", "한글", "漢字かな交じり文", "𠀀𠀁𪚥",
          "東京2024年", "中文English混合", "。、「」『』【】", "ＡＢＣ全角", "〇一二三"]
    # Other scripts and symbols.
    s += ["ᚠᚢᚦᚨᚱᚲ", "ꦧꦱꦗꦮ", "ⴰⵣⵓⵍ", "አማርኛ", "ᏣᎳᎩ", "𐌰𐌱𐌲", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𝐁𝐨𝐥𝐝",
          "∀x∈ℝ: x²≥0", "∑∫∂√∞≈≠≤≥", "←↑→↓⇒⇔", "♠♣♥♦", "©®™", "°C ‰ ‱", "♩♪♫♬",
          "⠓⠑⠇⠇⠕", "☃★☆", "░▒▓█", "┌─┐│└┘", "\ufeffBOM at start", "mid\ufeffBOM",
          "zero\u200bwidth\u200cnon\u200djoiner", "\u2060word joiner", "soft\u00adhyphen",
          "\ufffd replacement", "\uffff\ufffe nonchars", "\U0010fffd plane 16",
          "\ue000 private use", "\x01\x02\x1f controls", "\x7f del", "\u0085 NEL",
          "\u2028line sep\u2029para sep"]
    # Emoji.
    s += ["😀", "😀😃😄", "🦊", "👍", "👍🏻", "👍🏽", "👍🏿", "👩‍💻", "👨‍👩‍👧‍👦",
          "🏳️‍🌈", "🏴‍☠️", "🇺🇸🇯🇵", "🇫🇷", "❤️", "❤", "✔️", "1️⃣", "#️⃣",
          "🧑🏾‍🤝‍🧑🏻", "👩🏽‍🔬", "🤷‍♀️", "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "hello 😀 world", "emoji😀glued",
          "😀 " * 10, "🙂🙃" * 8]
    # Special-token look-alikes.
    s += ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nHi<|im_end|>\n",
          "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
          "Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
          "<|im_", "<|im_start", "im_start|>", "<|im_start|", "|im_start|>", "<| im_start |>",
          "<|IM_START|>", "< |im_start|>", "<|im_start|><|im_end|>", "<|im_start|><|im_start|>",
          "x<|im_end|>y", " <|im_end|> ", "<|endoftext|><|endoftext|>", "<|endoftext",
          "<repo_name>", "<reponame>foo<file_sep>bar.py<filename>", "<gh_stars>100",
          "<issue_start><issue_comment><issue_closed>", "<jupyter_start><jupyter_code>x=1",
          "<jupyter_output><empty_output><jupyter_text><jupyter_script>",
          "<|im_start|>\n<|im_end|>\n", "<s></s>", "<|eot_id|>", "[INST]", "<unk>", "<pad>",
          "<|", "|>", "<||>", "<|<|im_end|>|>"]
    # Code.
    s += ["int main(void) { return 0; }",
          "#include <stdio.h>\nint main(int argc, char **argv) {\n    printf(\"%d\\n\", argc);\n}\n",
          "def foo(x, y=2):\n    return x ** y  # comment\n",
          "    if x:\n        pass\n",
          "class A:\n\tdef __init__(self):\n\t\tself.x = None\n",
          "for (let i = 0; i < arr.length; i++) { console.log(arr[i]); }",
          "const f = async (a) => { await g(a); };",
          "fn main() { let v: Vec<u8> = vec![1, 2, 3]; println!(\"{:?}\", v); }",
          "func main() {\n\tfmt.Println(\"hi\")\n}",
          "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
          "<html><body><p class=\"x\">Hi &amp; bye</p></body></html>",
          "{\"key\": [1, 2.5, true, null], \"nested\": {\"a\": \"b\"}}",
          "$ ls -la | grep '^d' && echo \"done\" > /dev/null 2>&1",
          "x = y != z && a <= b || c >= d; i++; j--; k += 1; m ->n; p::q",
          "public static void main(String[] args) { System.out.println(\"Hi\"); }",
          "#!/bin/bash\nset -euo pipefail\n",
          "\\documentclass{article}\\begin{document}$E=mc^2$\\end{document}",
          "    \n    \n", "\t\n\t\n", "// TODO: fix\n/* block */", "a==b===c!==d",
          "0b1010 0o17 0xff", "x_1 = arr[0][1]; __dunder__", "snake_case camelCase PascalCase kebab-case",
          "```python\nprint('hi')\n```", "diff --git a/x b/x\n@@ -1,2 +1,2 @@\n-old\n+new\n"]
    # URLs and paths.
    s += ["https://example.com", "https://example.com/path/to/page?query=1&x=y#frag",
          "http://user:pass@host:8080/a%20b", "ftp://ftp.example.org/file.tar.gz",
          "www.example.co.uk", "mailto:someone@example.com", "/usr/local/bin/python3",
          "C:\\Windows\\System32\\drivers\\etc\\hosts", "./relative/../path", "~/.bashrc",
          "https://例え.jp/パス", "https://en.wikipedia.org/wiki/Byte_pair_encoding"]
    # Very long words and repetitions.
    s += ["supercalifragilisticexpialidocious", "Pneumonoultramicroscopicsilicovolcanoconiosis",
          "a" * 300, "ab" * 150, "abc" * 100, "x" * 1000, "Rindfleischetikettierungsüberwachungsaufgabenübertragungsgesetz",
          "hippopotomonstrosesquippedaliophobia" * 3, "!" * 50, "." * 80, "-" * 100,
          "=" * 64, "#" * 40, "_" * 33, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa bbbbbbbbbbbbbbbbbbbbbbb",
          "ñ" * 100, "中" * 100, "😀" * 50, " " * 200, "\n" * 50, "\t" * 30, "\r\n" * 20,
          "ThisIsAVeryLongCamelCaseIdentifierThatNeverEnds" * 2, "1" * 200,
          # The longest vocabulary entries (80 and 81 bytes): "#"*80 and "\n" + 80 spaces.
          "#" * 80, "#" * 81, "\n" + " " * 80 + "x", "x\n" + " " * 80 + "}"]
    # Mixed-up and invalid-looking.
    s += ["a1!b2@c3#", "Hello123World456", "test-123_abc.xyz", "mixed中文and한국어andعربي",
          "\u00e9\u0301", "ﬁ ﬂ ﬀ ligatures", "Ⓐⓑⓒ", "⁰¹²³", "＜｜im_start｜＞", "<\u200b|im_start|>",
          "tab\tseparated\tvalues\n1\t2\t3", "CSV,with,\"quoted,comma\",fields",
          "mixed\r\nline\nendings\rhere", "trailing newline\n", "ends with space ",
          " 123 456 ", "a.b.c.d.e.f", "?!?!?!", "¿Qué? ¡Sí!", "«guillemets» „Anführung“",
          "— em dash – en dash", "°º¤ø,¸¸,ø¤º°", "(╯°□°)╯︵ ┻━┻", "¯\\_(ツ)_/¯",
          "l33t sp34k 4 3v3r", "I/O, A/B, TCP/IP", "e.g., i.e., etc.", "Mr. Smith Jr.",
          "U.S.A.", "O'Brien's", "rock'n'roll's", "ʼmodifier apostropheʼ",
          "\u00a0\u00a0", "x\u00a0\u00a0y", "a \u3000b", "x\u2009y thin space"]
    # Paragraphs.
    s += ["The quick brown fox jumps over the lazy dog.",
          "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.",
          "In the beginning God created the heaven and the earth. And the earth was without "
          "form, and void; and darkness was upon the face of the deep.",
          paragraph_2k()]
    return s


def xcheck_llama(model: str, jsonl: str) -> int:
    """Compare the jsonl with llama.cpp (via llama-cpp-python). Pieces are read with a
    1024-byte buffer: Llama.detokenize uses 32 bytes per token and truncates longer tokens."""
    import ctypes
    import llama_cpp
    llm = llama_cpp.Llama(model_path=model, vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)

    def piece(t):
        buf = ctypes.create_string_buffer(1024)
        n = llama_cpp.llama_token_to_piece(vocab, t, buf, len(buf), 0, True)
        if n < 0:
            raise SystemExit(f"token_to_piece({t}) failed: {n}")
        return buf.raw[:n]

    n_bad = 0
    with open(jsonl, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    for r in rows:
        b = r["text"].encode("utf-8")
        got = {"ids": llm.tokenize(b, add_bos=False, special=False),
               "ids_special": llm.tokenize(b, add_bos=False, special=True),
               "decoded": b"".join(piece(t) for t in r["ids"]).decode("utf-8", "replace")}
        diff = [k for k in got if got[k] != r[k]]
        if diff:
            n_bad += 1
            print(f"DISAGREE {r['text']!r}:", {k: (r[k], got[k]) for k in diff})
    print(f"llama.cpp (llama-cpp-python {llama_cpp.__version__}): {len(rows)} rows, "
          f"{n_bad} disagree")
    return 1 if n_bad else 0


def main(argv) -> int:
    if len(argv) > 1 and argv[1] == "--xcheck-llama":
        return xcheck_llama(argv[2] if len(argv) > 2 else DEFAULT_MODEL,
                            argv[3] if len(argv) > 3 else DEFAULT_OUT)
    # Imported here so that --xcheck-llama runs in an environment without gguf/tokenizers.
    from gguf_tokenizer import build_tokenizer, encode_plain, encode_special, read_tokenizer_metadata
    model = argv[1] if len(argv) > 1 else DEFAULT_MODEL
    out = argv[2] if len(argv) > 2 else DEFAULT_OUT
    meta = read_tokenizer_metadata(model)
    # Cross-check of what is reproduced: the pipeline below is SmolLM2's, valid for pre=smollm.
    assert meta["model"] == "gpt2" and meta["pre"] == "smollm", (meta["model"], meta["pre"])
    assert meta["add_bos"] is False
    tok = build_tokenizer(meta, register_special=True)
    tok_nospecial = build_tokenizer(meta, register_special=False)
    tokens = meta["tokens"]

    strings = hard_strings()
    seen = set()
    rows = []
    for text in strings:
        if text in seen:
            continue
        seen.add(text)
        ids = encode_plain(tok, text)
        ids_special = encode_special(tok, text)
        # Second route to "no special parsing": control tokens not registered at all.
        ids_alt = tok_nospecial.encode(text, add_special_tokens=False).ids
        if ids != ids_alt:
            raise SystemExit(f"plain-encode routes disagree on {text!r}: {ids} vs {ids_alt}")
        # Plain ids must never contain a control token (their text cannot come out of BPE).
        bad = [i for i in ids if meta["token_type"][i] != 1]
        if bad:
            raise SystemExit(f"control token {bad} in plain ids of {text!r}")
        if "<|" not in text and "<" not in text and ids != ids_special:
            raise SystemExit(f"special parsing changed ids of {text!r}")
        decoded = tok.decode(ids, skip_special_tokens=False)
        if decoded != text:
            raise SystemExit(f"round trip failed for {text!r}: {decoded!r}")
        rows.append({"text": text, "ids": ids, "ids_special": ids_special, "decoded": decoded})
        assert all(0 <= i < len(tokens) for i in ids + ids_special)

    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    n_special_diff = sum(1 for r in rows if r["ids"] != r["ids_special"])
    print(f"wrote {len(rows)} cases ({n_special_diff} where special parsing differs) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
