// The value types that cross the engine boundary: requests in, events out. Plain data, copied
// or moved between threads; nothing here touches llama.cpp state.
#pragma once

#include <cstdint>
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

// The defaults here are llamabox's defaults: Python's SamplingParams and the CLI read them.
struct request {
    uint64_t                 id_req       = 0;
    request_kind             kind         = REQUEST_KIND_COMPLETION;
    std::vector<llama_token> prompt;             // the prompt as tokens, or
    std::string              text;               // as text, tokenized by engine::prepare()
    bool                     add_special  = true;   // BOS etc. when tokenizing `text`
    bool                     parse_special = true;  // special tokens written in `text` count
    int32_t                  n_predict    = -1;  // < 0: until the slot context is full
    std::vector<std::string> stop;
    sampling_params          sampling;
    bool                     cache_prompt = true;
    speculative_override     speculative;
    std::string              tag;                // the caller's request id, for logs
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
    llama_token fim_pre = LLAMA_TOKEN_NULL;
    llama_token fim_suf = LLAMA_TOKEN_NULL;
    llama_token fim_mid = LLAMA_TOKEN_NULL;
    llama_token bos = LLAMA_TOKEN_NULL;
    llama_token eos = LLAMA_TOKEN_NULL;
    bool        add_bos = false;
    bool        embeddings = false;   // embed requests are served
    int32_t     pooling = 0;          // llama_pooling_type in use for embeddings
    int32_t     n_embd_tokens_max = 0;  // longest embedding input
};

}  // namespace llamabox
