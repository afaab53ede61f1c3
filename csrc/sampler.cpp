#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "errors.h"
#include "input_limits.h"
#include "json-schema-to-grammar.h"
#include "json.h"
#include "model.h"

namespace llamabox {

namespace {

// The grammar text of a JSON schema, converted on a thread with a stack large enough for the
// converter's recursion (the schema's shape is bounded first).
std::string schema_grammar(const std::string & json_schema) {
    std::string grammar;
    try {
        run_with_stack(SCHEMA_STACK_BYTES, [&] {
            const common_json schema = common_json::parse(json_schema);
            check_schema(schema);
            grammar = json_schema_to_grammar(schema);
        });
    } catch (const invalid_request & e) {
        throw invalid_request(e.what(), "json_schema");
    } catch (const std::exception & e) {
        throw invalid_request(std::string("invalid JSON schema: ") + e.what(), "json_schema");
    }
    return grammar;
}

// Keeps the k largest of `n` values in `heap` (a min-heap by `worse`), then sorts it best first.
template <typename Push>
void top_k_of(int32_t n, int32_t k, std::vector<llama_token_data> & heap, const Push & value_of) {
    const auto worse = [](const llama_token_data & a, const llama_token_data & b) { return a.logit > b.logit; };
    heap.clear();
    for (int32_t i = 0; i < n; ++i) {
        const float v = value_of(i);
        if ((int32_t) heap.size() < k) {
            heap.push_back({i, v, 0.0f});
            std::push_heap(heap.begin(), heap.end(), worse);
        } else if (v > heap.front().logit) {
            std::pop_heap(heap.begin(), heap.end(), worse);
            heap.back() = {i, v, 0.0f};
            std::push_heap(heap.begin(), heap.end(), worse);
        }
    }
    std::sort_heap(heap.begin(), heap.end(), worse);  // descending
}

// The template's side of a tool-call grammar: its special tokens, its triggers (a trigger word
// that is one preserved token becomes a token trigger, as it can only be sampled whole) and
// the generation prompt, which the grammar consumes before the answer.
void set_tool_grammar(const model & m, const sampling_params & sp, common_params_sampling & cp,
                      std::set<llama_token> & preserved) {
    for (const auto & text : sp.preserved_tokens) {
        const auto ids = m.tokenize(text, false, true);
        if (ids.size() == 1) preserved.insert(ids[0]);
    }
    cp.preserved_tokens = preserved;
    for (const auto & [type, value] : sp.grammar_triggers) {
        if (type < COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN || type > COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL) {
            throw invalid_request("unknown grammar trigger type " + std::to_string(type), "grammar_triggers");
        }
        common_grammar_trigger trigger{(common_grammar_trigger_type) type, value, LLAMA_TOKEN_NULL};
        if (trigger.type == COMMON_GRAMMAR_TRIGGER_TYPE_WORD || trigger.type == COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN) {
            const auto ids = m.tokenize(value, false, true);
            if (ids.size() == 1 && (preserved.count(ids[0]) || trigger.type == COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN)) {
                trigger.type  = COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN;
                trigger.token = ids[0];
            } else {
                trigger.type = COMMON_GRAMMAR_TRIGGER_TYPE_WORD;
            }
        }
        cp.grammar_triggers.push_back(std::move(trigger));
    }
    if (sp.grammar_lazy && cp.grammar_triggers.empty() && !cp.grammar.empty()) {
        throw invalid_request("a lazy grammar needs at least one trigger", "grammar_triggers");
    }
    cp.grammar_lazy = sp.grammar_lazy;
    if (sp.tool_grammar) cp.generation_prompt = sp.generation_prompt;
}

}  // namespace

std::unique_ptr<request_sampler> make_sampler(const model & m, const sampling_params & sp, uint32_t seed,
                                              int32_t n_ctx_slot) {
    const int32_t n_vocab = m.n_vocab();
    // Ranges are the wire types' to check; a non-finite value would only reach llama.cpp's
    // arithmetic from a caller of the Python API, and is refused here.
    const std::pair<const char *, float> floats[] = {
        {"temperature", sp.temperature}, {"top_p", sp.top_p}, {"min_p", sp.min_p}, {"typical_p", sp.typical_p},
        {"repeat_penalty", sp.repeat_penalty}, {"presence_penalty", sp.presence_penalty},
        {"frequency_penalty", sp.frequency_penalty}};
    for (const auto & [name, value] : floats) {
        if (!std::isfinite(value)) throw invalid_request(std::string(name) + " must be a finite number", name);
    }
    common_params_sampling cp;
    cp.seed            = seed;
    cp.temp            = sp.temperature;
    cp.top_k           = sp.temperature <= 0.0f ? 1 : sp.top_k;
    cp.top_p           = sp.top_p;
    cp.min_p           = sp.min_p;
    cp.typ_p           = sp.typical_p;
    cp.penalty_repeat  = sp.repeat_penalty;
    cp.penalty_last_n  = sp.repeat_last_n < 0 ? n_ctx_slot : std::min(sp.repeat_last_n, n_ctx_slot);
    cp.penalty_present = sp.presence_penalty;
    cp.penalty_freq    = sp.frequency_penalty;
    cp.no_perf         = true;
    for (const auto & [tok, bias] : sp.logit_bias) {
        if (tok < 0 || tok >= n_vocab) {
            throw invalid_request("logit_bias names token " + std::to_string(tok) + ", not in the vocabulary",
                                  "logit_bias");
        }
        if (std::isnan(bias) || bias == INFINITY) throw invalid_request("a logit_bias is not a number", "logit_bias");
        cp.logit_bias.push_back({tok, bias});
    }
    if (!sp.grammar.empty() && !sp.json_schema.empty()) {
        throw invalid_request("give either a grammar or a JSON schema, not both", "grammar");
    }
    auto s = std::make_unique<request_sampler>();
    s->n_vocab_ = n_vocab;
    s->has_grammar_ = !sp.grammar.empty() || !sp.json_schema.empty();
    // A grammar ends generation when complete (it then allows only end-of-generation tokens),
    // so ignore_eos applies only without one.
    s->ignore_eos_ = sp.ignore_eos && !s->has_grammar_;
    cp.ignore_eos = s->ignore_eos_;
    if (s->ignore_eos_) {
        for (const auto & [tok, bias] : m.eog_bias()) cp.logit_bias.push_back({tok, bias});
    }
    const char * constraint = sp.json_schema.empty() ? "grammar" : "json_schema";
    try {
        if (!sp.json_schema.empty()) {
            const std::string grammar = schema_grammar(sp.json_schema);
            check_grammar_limits(grammar);
            cp.grammar = common_grammar(COMMON_GRAMMAR_TYPE_USER, grammar);
        } else if (!sp.grammar.empty()) {
            check_grammar_limits(sp.grammar);
            cp.grammar = common_grammar(sp.tool_grammar ? COMMON_GRAMMAR_TYPE_TOOL_CALLS : COMMON_GRAMMAR_TYPE_USER,
                                        sp.grammar);
        }
    } catch (const invalid_request & e) {
        throw invalid_request(e.what(), constraint);
    }
    set_tool_grammar(m, sp, cp, s->preserved_);
    try {
        s->smpl_.reset(common_sampler_init(m.get(), cp));
    } catch (const std::exception & e) {  // a grammar that does not parse, a penalty out of range
        throw invalid_request(std::string(s->has_grammar_ ? "invalid grammar or sampling parameters: "
                                                          : "invalid sampling parameters: ") + e.what(),
                              s->has_grammar_ ? constraint : "");
    }
    if (!s->smpl_) {
        throw invalid_request(cp.grammar.empty() ? "cannot set up sampling" : "invalid grammar",
                              cp.grammar.empty() ? "" : constraint);
    }

    // Greedy with nothing that reshapes the logits is an argmax: skip the sampler chain, which
    // would copy and sort the whole (262k for Gemma) vocabulary for every token.
    const bool untouched = cp.grammar.empty() && sp.logit_bias.empty() && !m.has_suppress_tokens() &&
                           !s->ignore_eos_ && sp.repeat_penalty == 1.0f && sp.presence_penalty == 0.0f &&
                           sp.frequency_penalty == 0.0f;
    s->plain_greedy_ = sp.temperature <= 0.0f && untouched;
    // Sampling whose first effective filter is top-k can run the chain on the top-k tokens
    // alone: the same tokens, in the same order, and the same random draws.
    s->top_k_first_ = sp.temperature > 0.0f && untouched && cp.top_k > 0 && cp.top_k < n_vocab;
    s->top_k_ = cp.top_k;
    return s;
}

llama_token request_sampler::sample_top_k_first(const float * logits) {
    top_k_of(n_vocab_, top_k_, scratch_, [logits](int32_t i) { return logits[i]; });
    llama_token_data_array arr = {scratch_.data(), scratch_.size(), -1, true};
    llama_sampler_apply(common_sampler_get(smpl_.get()), &arr);
    return arr.data[arr.selected].id;
}

llama_token request_sampler::sample(llama_context * ctx, int32_t i_out) {
    const float * logits = llama_get_logits_ith(ctx, i_out);
    if (!logits) throw std::runtime_error("no logits for output " + std::to_string(i_out));
    if (plain_greedy_) {
        return (llama_token) (std::max_element(logits, logits + n_vocab_) - logits);
    }
    if (top_k_first_) {  // nothing bans a token on this path
        const llama_token tok = sample_top_k_first(logits);
        common_sampler_accept(smpl_.get(), tok, true);
        return tok;
    }
    const llama_token tok = common_sampler_sample(smpl_.get(), ctx, i_out);
    // Every token banned (-inf) means whatever was drawn is one of them: the grammar allows none
    // that logit_bias (and ignore_eos) leave, or refers to tokens outside the vocabulary.
    const char * why = has_grammar_ ? "the grammar allows no token here (those it allows are banned by logit_bias, "
                                      "or outside the vocabulary)"
                                    : "logit_bias (with ignore_eos) bans every token";
    const llama_token_data_array * cur = common_sampler_get_candidates(smpl_.get(), false);
    if (cur->selected < 0 || (size_t) cur->selected >= cur->size || cur->data[cur->selected].logit == -INFINITY) {
        throw constraint_error(std::string("no token can be sampled: ") + why);
    }
    try {
        common_sampler_accept(smpl_.get(), tok, true);  // throws if the token breaks the grammar
    } catch (const std::exception & e) {
        if (!has_grammar_) throw;
        throw constraint_error(std::string("no token can be sampled: ") + why + " (" + e.what() + ")");
    }
    return tok;
}

token_logprob request_sampler::logprob(const float * logits, llama_token token, int32_t n_top) {
    const float max_l = *std::max_element(logits, logits + n_vocab_);
    double sum = 0.0;
    for (int32_t i = 0; i < n_vocab_; ++i) sum += std::exp((double) (logits[i] - max_l));
    const float lse = max_l + (float) std::log(sum);
    token_logprob lp;
    lp.token = token;
    lp.logprob = logits[token] - lse;
    n_top = std::min(n_top, n_vocab_);
    if (n_top > 0) {
        top_k_of(n_vocab_, n_top, scratch_, [logits](int32_t i) { return logits[i]; });
        for (const auto & c : scratch_) lp.top.push_back({c.id, c.logit - lse});
    }
    return lp;
}

}  // namespace llamabox
