// One request's sampler: llama.cpp's common_sampler chain plus two exact shortcuts, and the
// log-probabilities of what it samples.
//
// Thread safety: make_sampler() from any thread (it reads the model only); a sampler is then
// used by the engine thread alone.
#pragma once

#include <cstdint>
#include <memory>
#include <set>
#include <stdexcept>
#include <vector>

#include "request.h"
#include "sampling.h"

namespace llamabox {

class model;

// The request's own constraints (grammar, logit_bias, ignore_eos) leave no token to sample: the
// request's fault (HTTP 400), not the server's.
struct constraint_error : std::runtime_error { using std::runtime_error::runtime_error; };

class request_sampler {
public:
    // Samples from row `i_out` of the context's logits and accepts the token into the chain's
    // state (grammar, penalties). Throws constraint_error, or std::runtime_error.
    llama_token sample(llama_context * ctx, int32_t i_out);

    // The token's log-probability under the raw logits, with the `n_top` most likely tokens.
    token_logprob logprob(const float * logits, llama_token token, int32_t n_top);

    bool ignore_eos() const { return ignore_eos_; }
    // Whether the output text shows this token's text although it is special (a tool-call
    // format's own tokens, which the answer's parser reads).
    bool renders(llama_token token) const { return !preserved_.empty() && preserved_.count(token) > 0; }

private:
    friend std::unique_ptr<request_sampler> make_sampler(const model &, const sampling_params &, uint32_t, int32_t);
    llama_token sample_top_k_first(const float * logits);

    common_sampler_ptr smpl_;
    int32_t n_vocab_      = 0;
    int32_t top_k_        = 0;
    bool    plain_greedy_ = false;  // argmax over the logits; no sampler chain needed
    bool    top_k_first_  = false;  // nothing before top-k changes the logits
    bool    ignore_eos_   = false;  // as asked, unless a grammar decides the end
    bool    has_grammar_  = false;
    std::set<llama_token> preserved_;
    std::vector<llama_token_data> scratch_;  // top-k candidates, reused token after token
};

// Builds a request's sampler. `seed` is the resolved seed (LLAMA_DEFAULT_SEED: random);
// `n_ctx_slot` bounds repeat_last_n. Converts a JSON schema to a grammar, bounded first.
// Throws invalid_request for a grammar, schema or setting llama.cpp refuses.
std::unique_ptr<request_sampler> make_sampler(const model & m, const sampling_params & sp, uint32_t seed,
                                              int32_t n_ctx_slot);

}  // namespace llamabox
