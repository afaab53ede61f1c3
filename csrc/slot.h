// A request being served (task) and the slot that serves it. Decode-thread state only: the
// engine's step code (step.cpp) and loop (engine.cpp) share these, nothing else sees them.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include "request.h"
#include "sampler.h"
#include "text.h"

namespace llamabox {

inline int64_t now_us() {  // the clock of a task's timings
    return std::chrono::duration_cast<std::chrono::microseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

// One request's speculative-decoding settings, resolved against the server's at submit.
struct task_speculation {
    uint32_t types   = 0;     // bit per drafting type (speculator.h); 0 = none
    int32_t  n_max   = 0;     // longest draft per step
    int32_t  n_min   = 0;     // shorter drafts are not verified
    float    p_min   = 0.0f;  // draft model's confidence floor
    // The scheduler's estimate of P(next draft token accepted | the ones before were), updated
    // after every verification; it decides how many draft tokens are worth a step.
    double   acceptance = 0.5;
    std::vector<llama_token> draft;  // this step's draft, verified with next_token
    int32_t  type_last = -1;         // the type that made `draft`
    int32_t  n_tail    = 0;          // the draft model's KV holds this many tokens from next_token on
    int32_t  n_offered = 0;          // the draft's length before the policy cut it
    int32_t  n_real = 0;             // of the draft, tokens drafted (the rest pads the step's shape)
    // An n-gram draft the policy did not verify, checked against the tokens that follow: the
    // acceptance estimate keeps learning at no cost while drafts do not pay (else it could
    // never rise again).
    std::vector<llama_token> shadow;
    size_t   shadow_pos = 0;
};

struct task {
    request            req;
    std::unique_ptr<request_sampler> smpl;  // generation only
    utf8_decoder       utf8;
    stop_matcher       stops;
    task_speculation   spec;
    std::vector<float> lora;  // a scale per loaded adapter (empty when none is loaded)
    uint64_t           t_arrival  = 0;
    bool               generating = false;
    // The token that goes into the next step: the last prompt token first, then each sampled
    // one. The last prompt token is decoded on its own (or with its draft), like a sampled
    // token, so its logits (and the first sampled token) never depend on how much of the
    // prompt was cached.
    llama_token        next_token = LLAMA_TOKEN_NULL;
    int32_t            n_cached   = 0;
    int32_t            n_decoded  = 0;
    int32_t            n_drafted  = 0;  // draft tokens verified
    int32_t            n_accepted = 0;  // of which accepted
    int64_t            t_start_us = 0;
    int64_t            t_first_us = 0;
    event              ev;  // this step's output, flushed at the end of the step

    size_t n_prefill() const { return req.prompt.size() - 1; }  // prompt tokens decoded as prefill
    // The media input whose rows hold prompt position p, or null.
    const media_chunk * media_at(size_t p) const {
        for (const auto & c : req.media_chunks) {
            if (p >= c.pos && p < c.pos + (size_t) c.n_tokens) return &c;
        }
        return nullptr;
    }
    // Prompt tokens from p on that a step can decode as text: up to the next media input, or
    // to the end of the prefill.
    int32_t text_run(size_t p) const {
        size_t end = n_prefill();
        for (const auto & c : req.media_chunks) {
            if (c.pos + (size_t) c.n_tokens > p) {
                end = std::min(end, std::max(c.pos, p));
                break;
            }
        }
        return (int32_t) (end > p ? end - p : 0);
    }
};

// A media input in a slot's cache whose rows take fewer positions than their count (an M-RoPE
// image: n_tokens rows at n_pos positions, all sharing the first in the KV's main component).
struct pos_span {
    size_t  begin    = 0;  // its first row's cache index
    int32_t n_tokens = 0;
    int32_t n_pos    = 0;
};

struct slot {
    int32_t                  id = 0;
    // Tokens whose KV is in sequence `id`: one KV cell each, in order. Index i is at position i
    // but past the spans before it (pos_at); the step asks pos_next(), never the size.
    std::vector<llama_token> cache;
    std::vector<pos_span>    spans;  // in cache order; empty without M-RoPE media
    int32_t                  n_draft_synced = 0;  // of `cache`, how many the draft model's KV holds
    uint64_t                 t_last_used = 0;
    std::vector<float>       cache_lora;  // the adapter scales `cache`'s KV was computed under
    uint64_t                 t_last_step = 0;  // when it last put tokens into a step (clock)
    std::unique_ptr<task>    t;      // null when idle
    int32_t                  n_step  = 0;   // tokens this slot put into the current batch
    int32_t                  i_out   = -1;  // batch index of its first output, -1 if none

    bool      is_idle() const { return t == nullptr; }
    // The position of cache index i. An index inside a span gives the span's first position:
    // the KV can drop a span only whole (keep_point).
    llama_pos pos_at(size_t i) const {
        llama_pos shift = 0;
        for (const auto & sp : spans) {
            if (i <= sp.begin) break;
            if (i < sp.begin + (size_t) sp.n_tokens) return (llama_pos) sp.begin - shift;
            shift += sp.n_tokens - sp.n_pos;
        }
        return (llama_pos) i - shift;
    }
    // The longest cache prefix of at most n tokens that the KV can keep: n, or the start of the
    // span n falls inside.
    size_t keep_point(size_t n) const {
        for (const auto & sp : spans) {
            if (n > sp.begin && n < sp.begin + (size_t) sp.n_tokens) return sp.begin;
        }
        return n;
    }
    llama_pos pos_next() const { return pos_at(cache.size()); }
};

}  // namespace llamabox
