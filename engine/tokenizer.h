/* tokenizer.h - tokenizers built from GGUF metadata: byte-level BPE (pre-tokenizers smollm,
 * llama-bpe, gpt2) and SentencePiece-style "llama" vocabularies; incremental detokenisation;
 * chat templates (ChatML, Llama 3, Llama 2/Zephyr). No model math here. */
#ifndef HY_TOKENIZER_H
#define HY_TOKENIZER_H

#include "gguf.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct tok_vocab tok_vocab;

/* Build from tokenizer.ggml.* keys. Errors name the key or the unsupported model/pre.
 * The vocab copies what it needs (the gguf may be closed afterwards). Free with tok_free.
 * A loaded vocab is never modified: any number of threads may encode and decode with it at once.
 * Letter/number/space classes follow Unicode 16.0 (engine/unicode_tables.h), the tables of the
 * Hugging Face `tokenizers` reference. */
int tok_load(const gguf_file *f, tok_vocab **out);
void tok_free(tok_vocab *v);

int tok_n_vocab(const tok_vocab *v);
int32_t tok_bos(const tok_vocab *v);   /* -1 when none */
int32_t tok_eos(const tok_vocab *v);
bool tok_add_bos(const tok_vocab *v);  /* tokenizer.ggml.add_bos_token */
int32_t tok_pad(const tok_vocab *v);   /* tokenizer.ggml.padding_token_id; -1 when none */
int32_t tok_unk(const tok_vocab *v);   /* -1 when none */
/* tokenizer.chat_template verbatim (Jinja text, owned by the vocab), NULL when the file has none
 * (or one that is over 1 MiB or holds a NUL). */
const char *tok_chat_template(const tok_vocab *v);
/* The Hugging Face tokenizer class this vocabulary corresponds to ("GPT2TokenizerFast" for GPT-2
 * style BPE, "PreTrainedTokenizerFast" for Llama 3's, "LlamaTokenizerFast" for SentencePiece). */
const char *tok_hf_class(const tok_vocab *v);
/* End of generation: EOS, EOT, <|im_end|>, <|eot_id|> and other control tokens marked so. */
bool tok_is_eog(const tok_vocab *v, int32_t id);
/* The token's raw vocabulary string (NUL-terminated), NULL when out of range. */
const char *tok_text(const tok_vocab *v, int32_t id);
/* The raw bytes a token decodes to (byte-level mapping undone; SentencePiece ▁ as a space), not
 * NUL-terminated, *len of them; NULL when out of range. Owned by the vocab. */
const unsigned char *tok_piece(const tok_vocab *v, int32_t id, size_t *len);
/* True for control tokens (token_type 3: BOS, EOS, <|im_start|>, ...). */
bool tok_is_control(const tok_vocab *v, int32_t id);

/* Encode UTF-8 text. parse_special: text of control/user-defined tokens (e.g. "<|im_start|>")
 * becomes those tokens; otherwise it is tokenised as ordinary text. add_bos: prepend BOS
 * (when the vocab has one). *ids is malloc'ed, owned by the caller (free()).
 * Invalid UTF-8 is handled byte-wise as the reference tokenizers do. */
int tok_encode(const tok_vocab *v, const char *text, size_t len, bool parse_special, bool add_bos,
               int32_t **ids, int *n_ids);

/* Decode ids to text. skip_special: drop control tokens' text. *out is malloc'ed,
 * NUL-terminated, owned by the caller (free()). */
int tok_decode(const tok_vocab *v, const int32_t *ids, int n, bool skip_special, char **out,
               size_t *out_len);

/* Incremental detokeniser: push one id at a time; emits only complete UTF-8 characters
 * (bytes of a split character are held until it completes; tok_detok_flush emits leftovers
 * as U+FFFD). Control tokens' text is skipped. */
typedef struct {
    const tok_vocab *v;
    unsigned char pending[8];
    int n_pending;
    bool first;  /* SentencePiece: strip the leading space of the first piece */
    size_t n_dropped; /* bytes of whole characters that did not fit in `cap` (0 when cap is enough) */
} tok_detok;
void tok_detok_init(tok_detok *d, const tok_vocab *v);
/* Writes into out (cap bytes incl. NUL, always NUL-terminated) and returns bytes written.
 * A cap of tok_detok_cap(v) always suffices; with less, characters that do not fit are dropped
 * whole (counted in n_dropped), never split. Pieces can be longer than 64 bytes: size `out`
 * with tok_detok_cap. The concatenated output of push..., flush equals
 * tok_decode(..., skip_special = true). */
size_t tok_detok_push(tok_detok *d, int32_t id, char *out, size_t cap);
size_t tok_detok_flush(tok_detok *d, char *out, size_t cap);
/* Output buffer size that tok_detok_push / tok_detok_flush can never overflow for this vocab. */
size_t tok_detok_cap(const tok_vocab *v);

/* Chat templates.
 * TOK_CHAT_CHATML is SmolLM2's ChatML: it injects SmolLM2's default system prompt ("You are a
 * helpful AI assistant named SmolLM, trained by Hugging Face") when the first message is not a
 * system message. TOK_CHAT_CHATML_PLAIN is ChatML without any default system prompt.
 * Where a template starts with the BOS text (Llama 3, Llama 2's first turn) the rendered string
 * leaves it out: encode it with add_bos = tok_add_bos(v) and parse_special = true. */
typedef enum {
    TOK_CHAT_NONE = 0, TOK_CHAT_CHATML, TOK_CHAT_LLAMA3, TOK_CHAT_LLAMA2, TOK_CHAT_ZEPHYR,
    TOK_CHAT_CHATML_PLAIN,
} tok_chat_kind;
typedef struct {
    const char *role;    /* "system", "user", "assistant" (ChatML and Llama 3 accept any role) */
    const char *content;
} tok_msg;
/* Pick the template matching tokenizer.chat_template by its distinctive text: '<|im_start|>'
 * ChatML (SmolLM2's when it carries SmolLM2's default system prompt, else plain),
 * '<|start_header_id|>' Llama 3, '[INST]' Llama 2, '<|user|>' Zephyr. name != NULL overrides:
 * "chatml", "chatml-plain", "llama3", "llama2", "zephyr". Unknown template or name ->
 * HY_EUNSUPPORTED; no template in the file and no name -> HY_ENOTFOUND; clear messages. */
int tok_chat_detect(const gguf_file *f, const char *name, tok_chat_kind *out);
/* Render messages the way the model's template does (ChatML for SmolLM2 includes its default
 * system prompt when the first message is not a system message), optionally ending with the
 * assistant generation prompt. *out malloc'ed, owned by the caller. HY_EINVAL for messages the
 * template refuses (Llama 2: roles must alternate user/assistant after an optional system;
 * Llama 2 and Zephyr: roles other than system/user/assistant). */
int tok_chat_apply(tok_chat_kind kind, const tok_msg *msgs, int n, bool add_generation_prompt,
                   char **out);
/* Short name of a kind ("chatml", ...), "none" for TOK_CHAT_NONE. */
const char *tok_chat_name(tok_chat_kind kind);

#endif
