// The value types that cross the engine boundary: requests in, events out. Plain data, copied
// or moved between threads; nothing here touches llama.cpp state.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "llama.h"

namespace llamabox {

struct sampling_params {
    float   temperature       = 0.8f;  // 0 = greedy
    int32_t top_k             = 40;
    float   top_p             = 0.95f;
    float   min_p             = 0.05f;
    float   typical_p         = 1.0f;
    float   repeat_penalty    = 1.0f;
    int32_t repeat_last_n     = 64;    // -1 = the whole slot context
    float   presence_penalty  = 0.0f;
    float   frequency_penalty = 0.0f;
    int64_t seed              = -1;    // < 0: the engine's default seed
    std::vector<std::pair<llama_token, float>> logit_bias;
    std::string grammar;               // GBNF
    std::string json_schema;           // JSON text; converted to GBNF at submit
    // A chat template's tool-call grammar (chat_render): `grammar` then holds it, applied from
    // the start, or, when lazy, from the first trigger on. Triggers are
    // (common_grammar_trigger_type, text or pattern); preserved tokens are special tokens the
    // template's format uses, rendered in the output text (the answer's parser reads them).
    bool    tool_grammar      = false;
    bool    grammar_lazy      = false;
    std::vector<std::pair<int32_t, std::string>> grammar_triggers;
    std::vector<std::string> preserved_tokens;
    std::string generation_prompt;     // what the template put after the last message
    bool    ignore_eos        = false;
    bool    logprobs          = false; // report each sampled token's log-probability
    int32_t n_probs           = 0;     // and this many top alternatives
};

// A request's own speculative-decoding settings; each unset one (< 0, empty) is the server's.
struct speculative_override {
    int32_t     n_max = -1;  // longest draft per step; 0 = no speculation for this request
    int32_t     n_min = -1;  // shortest draft worth verifying
    float       p_min = -1;  // draft model: stop drafting below this top-token probability
    std::string type;        // one drafting type (see speculator.h), or "none"
};

enum request_kind : int32_t {
    REQUEST_KIND_COMPLETION = 0,
    REQUEST_KIND_EMBEDDING  = 1,
};

// One media input (an image, an audio clip) in a prepared prompt (media.h): its embedding rows
// take the places of prompt tokens [pos, pos + n_tokens), which hold its placeholders.
// Under M-RoPE (Qwen2-VL and its kin) an image's rows take 2-D positions: n_tokens rows advance
// the sequence by n_pos = max(nx, ny) positions, and each row has four position components.
struct media_chunk {
    size_t      pos        = 0;
    int32_t     n_tokens   = 0;
    int32_t     n_pos      = 0;      // positions its rows take: n_tokens, but max(nx, ny) for M-RoPE images
    bool        non_causal = false;  // its rows attend to each other both ways (Gemma 3): one decode
    std::string id;                  // content hash
    std::shared_ptr<const std::vector<float>> embd;  // n_tokens rows of the model's input width
    // M-RoPE: the four components of each row's position with the input at position 0,
    // row-major (4 * n_tokens); bit j of mrope_shift: component j moves with the input's first
    // position (the others are absolute). Empty without M-RoPE.
    std::shared_ptr<const std::vector<llama_pos>> mrope;
    uint8_t     mrope_shift = 0;
};

// The defaults here are llamabox's defaults: Python's SamplingParams and the CLI read them.
struct request {
    uint64_t                 id_req       = 0;
    request_kind             kind         = REQUEST_KIND_COMPLETION;
    std::vector<llama_token> prompt;             // the prompt as tokens, or
    std::string              text;               // as text, tokenized by engine::prepare()
    // Rerank (an embedding request under rank pooling): `text` is the query, this the
    // document; prepare() joins them as the model's rerank template (or its separators) says.
    std::string              document;
    bool                     rerank = false;
    bool                     add_special  = true;   // BOS etc. when tokenizing `text`
    bool                     parse_special = true;  // special tokens written in `text` count
    int32_t                  n_predict    = -1;  // < 0: until the slot context is full
    std::vector<std::string> stop;
    sampling_params          sampling;
    bool                     cache_prompt = true;
    speculative_override     speculative;
    // LoRA adapters by id and scale, the others off; without has_lora, the server's scales
    // (POST /lora-adapters) at prepare time.
    std::vector<std::pair<int32_t, float>> lora;
    bool                     has_lora = false;
    std::string              tag;                // the caller's request id, for logs
    // Media files (image or audio bytes) for the markers in `text` (engine::media_marker());
    // prepare() turns them into media_chunks and clears them.
    std::vector<std::string> media;
    std::vector<media_chunk> media_chunks;       // in prompt order
};

// How far a model's load has come (its weights read, 0..1), for whoever waits on it; setting
// `cancelled` makes the load stop at the next tensor and fail (load_error).
struct load_progress {
    std::atomic<float> value{0.0f};
    std::atomic<bool>  cancelled{false};
};

enum finish_reason : int32_t {
    FINISH_REASON_NONE      = 0,
    FINISH_REASON_STOP      = 1,  // end-of-generation token or stop string
    FINISH_REASON_LENGTH    = 2,  // n_predict reached or slot context full
    FINISH_REASON_CANCELLED = 3,
    FINISH_REASON_ERROR     = 4,
};

struct top_logprob {
    llama_token token   = 0;
    float       logprob = 0.0f;
};

struct token_logprob {
    llama_token              token   = 0;
    float                    logprob = 0.0f;
    std::vector<top_logprob> top;
};

// One request's output of one engine step. The last event of a request has finish != NONE and
// carries its usage counts.
struct event {
    uint64_t                   id_req = 0;
    std::vector<llama_token>   tokens;    // sampled this step (end-of-generation tokens left out)
    std::string                text;      // valid UTF-8; never contains stop text
    std::vector<token_logprob> logprobs;  // one per token when asked
    finish_reason              finish = FINISH_REASON_NONE;
    std::string                stop_word;
    std::string                error;
    bool                       bad_request = false;  // the error is the request's own (HTTP 400)
    std::vector<float>         embedding; // embedding requests: n_rows x n_embd, normalized
    int32_t                    n_rows     = 0;

    int32_t n_prompt   = 0;
    int32_t n_cached   = 0;
    int32_t n_decoded  = 0;
    int32_t n_drafted  = 0;
    int32_t n_accepted = 0;
    double  t_prompt_ms = 0.0;
    double  t_gen_ms    = 0.0;
};

// What rendering a chat through the model's template (with tools, reasoning settings) gives: the prompt, and how to constrain and read the answer.
struct chat_render {
    std::string prompt;
    std::string grammar;  // the template's tool-call grammar (GBNF); empty: none
    bool        grammar_lazy = false;
    std::vector<std::pair<int32_t, std::string>> grammar_triggers;  // (common_grammar_trigger_type, value)
    std::vector<std::string> preserved_tokens;
    std::vector<std::string> additional_stops;
    std::string generation_prompt;  // the text the template put after the last message
    int32_t     format = 0;          // common_chat_format
    std::string format_name;
    std::string parser;              // llama.cpp's serialized answer parser; empty: plain content
    bool        supports_thinking = false;
    bool        parse_tool_calls  = false;  // tools were offered and tool_choice is not "none"
    bool        parallel_tool_calls = false;
    int32_t     reasoning_format  = 0;      // common_reasoning_format
    bool        parses = false;  // the answer needs the parser (tools, or a reasoning section)
};

struct chat_tool_call {
    std::string id;
    std::string name;
    std::string arguments;  // JSON text
};

// One piece of a streamed answer: text of the reasoning or the content, or a tool call's part
// (its id and name in its first piece, argument text after).
struct chat_delta {
    std::string reasoning;
    std::string content;
    int32_t     tool_index = -1;  // >= 0: a tool call's piece
    std::string tool_id;
    std::string tool_name;
    std::string tool_arguments;
};

struct chat_message {
    std::string content;
    std::string reasoning_content;
    std::vector<chat_tool_call> tool_calls;
};

struct slot_info {
    int32_t     id_slot   = 0;
    int32_t     state     = 0;  // 0 idle, 1 processing
    int32_t     n_cached  = 0;  // tokens in the slot's KV cache
    int32_t     n_prompt  = 0;
    int32_t     n_decoded = 0;
    int32_t     n_drafted = 0;   // draft tokens verified for the current request
    int32_t     n_accepted = 0;  // of which accepted
    float       draft_acceptance = 0.0f;  // the scheduler's estimate of its per-token acceptance
    std::string tag;
};

struct engine_stats {
    int32_t  n_slots    = 0;
    int32_t  n_busy     = 0;
    int32_t  n_queued   = 0;
    int64_t  kv_cells_used  = 0;
    int64_t  kv_cells_total = 0;
    int64_t  n_prompt_tokens_total   = 0;
    double   t_prompt_ms_total       = 0.0;
    int64_t  n_tokens_predicted_total = 0;
    double   t_predicted_ms_total    = 0.0;
    int64_t  n_tokens_drafted_total  = 0;
    int64_t  n_tokens_drafted_accepted_total = 0;
    int64_t  n_decode_total   = 0;
    int64_t  n_decode_failed_total = 0;  // llama_decode calls that failed (retried or not)
    int64_t  n_requests_total = 0;
    // media (--mmproj): inputs prepared, of which found in the projected cache, encoded
    int64_t  n_media_inputs_total = 0;
    int64_t  n_media_cache_hits_total = 0;
    int64_t  n_media_encoded_total = 0;
    double   t_media_encode_ms_total = 0.0;
    int32_t  n_media_cache_entries = 0;
    int64_t  n_media_decodes_total = 0;  // llama_decode calls of media rows
    std::vector<slot_info> slots;
};

struct model_info {
    std::string path;
    std::string description;
    std::string architecture;
    uint64_t    n_params    = 0;
    uint64_t    size_bytes  = 0;
    int32_t     n_vocab     = 0;
    int32_t     n_ctx_train = 0;
    int32_t     n_embd      = 0;
    int32_t     n_ctx       = 0;
    int32_t     n_ctx_slot  = 0;
    int32_t     n_swa       = 0;
    std::string chat_template;
    // What the template can do (llama.cpp's caps: supports_tools, supports_tool_calls,
    // supports_parallel_tool_calls, supports_system_role, ...) and whether it has a reasoning
    // section (supports_thinking); empty for a built-in template name
    std::map<std::string, bool> chat_template_caps;
    llama_token fim_pre = LLAMA_TOKEN_NULL;
    llama_token fim_suf = LLAMA_TOKEN_NULL;
    llama_token fim_mid = LLAMA_TOKEN_NULL;
    llama_token bos = LLAMA_TOKEN_NULL;
    llama_token eos = LLAMA_TOKEN_NULL;
    bool        add_bos = false;
    bool        embeddings = false;   // embed requests are served
    int32_t     pooling = 0;          // llama_pooling_type in use for embeddings
    int32_t     n_embd_tokens_max = 0;  // longest embedding input
    int32_t     n_cls_out = 0;          // scores per input under rank pooling (the rank head's rows)
    bool        vision = false;         // a projector (--mmproj) that takes images
    bool        audio  = false;         // ... audio
};

}  // namespace llamabox
