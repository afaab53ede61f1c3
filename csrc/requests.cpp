// The engine's calls from any thread: preparing requests (tokenize, samplers, speculation
// settings), submitting and cancelling them, the worker-thread jobs, events and stats. Nothing
// here touches decode-thread state; see engine.h for each call's contract.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <memory>

#include "embedder.h"
#include "engine.h"
#include "model.h"
#include "sampler.h"
#include "slot.h"
#include "speculator.h"

namespace llamabox {

prepared engine::prepare(request && req, const std::vector<uint64_t> & ids) const {
    if (ids.empty()) throw invalid_request("no request ids");
    const char * what = req.kind == REQUEST_KIND_EMBEDDING ? "input" : "prompt";
    if (req.rerank) {
        if (req.kind != REQUEST_KIND_EMBEDDING || !emb_ || emb_->pooling() != LLAMA_POOLING_TYPE_RANK) {
            throw invalid_request("this server was started without reranking (--rerank)");
        }
        if (!req.prompt.empty()) throw invalid_request("a rerank request gives the query as text", "query");
        req.prompt = model_->rerank_prompt(req.text, req.document);
        req.text.clear();
        req.document.clear();
    } else if (!req.media.empty()) {
        if (!media_) throw invalid_request("this model has no multimodal projector: start the server with --mmproj FILE", "media[0]");
        if (req.kind != REQUEST_KIND_COMPLETION) throw invalid_request("embeddings of media inputs are not supported", "media[0]");
        if (!req.prompt.empty()) throw invalid_request("a prompt with media is given as text", what);
        req.prompt = media_->tokenize(req.text, req.media, req.add_special, req.parse_special, req.media_chunks);
        req.media.clear();
        req.text.clear();
        for (const auto & c : req.media_chunks) {
            // A non-causal input's rows must all be in one ubatch (they attend to each other).
            if (c.non_causal && c.n_tokens > std::min(params_.n_ubatch, params_.n_batch)) {
                throw invalid_request("an image takes " + std::to_string(c.n_tokens) +
                                      " embeddings, more than the physical batch size (--ubatch-size) of " +
                                      std::to_string(std::min(params_.n_ubatch, params_.n_batch)), "media");
            }
        }
        if (!req.media_chunks.empty() && req.media_chunks.back().pos + req.media_chunks.back().n_tokens >= req.prompt.size()) {
            // The prompt's last token is decoded as the first generating step's (task::next_token).
            throw invalid_request("the prompt ends with a media input: put text (at least one token) after it", what);
        }
    } else if (!req.text.empty()) {
        if (!req.prompt.empty()) throw invalid_request("give the prompt as text or as tokens, not both", what);
        req.prompt = model_->tokenize(req.text, req.add_special, req.parse_special);
        req.text.clear();
        req.text.shrink_to_fit();
    } else {
        model_->check_tokens(req.prompt, what);
    }
    if (req.prompt.empty()) throw invalid_request(std::string("the ") + what + " is empty", what);

    prepared out;
    out.n_prompt = (int32_t) req.prompt.size();
    if (req.kind == REQUEST_KIND_EMBEDDING) {
        if (!emb_) throw invalid_request("this server was started without embeddings (--embeddings)");
        if (out.n_prompt > emb_->n_tokens_max()) {
            throw invalid_request("input has " + std::to_string(out.n_prompt) +
                                  " tokens, more than the physical batch size (--ubatch-size) of " +
                                  std::to_string(emb_->n_tokens_max()), "input");
        }
        for (uint64_t id : ids) {
            auto t = std::make_unique<task>();
            t->req = req;
            t->req.id_req = id;
            out.tasks.push_back(std::move(t));
        }
        return out;
    }
    if (out.n_prompt >= info_.n_ctx_slot) throw context_length_error(out.n_prompt, info_.n_ctx_slot);

    task_speculation spec = resolve_speculation(req.speculative);
    // Drafting is off for a prompt with media: n-gram lookups would draft placeholders, and the
    // draft model has no projector to decode the embeddings.
    if (!req.media_chunks.empty()) spec.types = 0;
    const std::vector<float> lora = resolve_lora(req);

    // One seed per choice: the request's, else the server's, else random for each choice.
    const int64_t base = req.sampling.seed >= 0 ? req.sampling.seed : params_.seed;
    for (size_t j = 0; j < ids.size(); ++j) {
        const uint32_t seed = base >= 0 ? (uint32_t) (((uint64_t) base + j) & 0xFFFFFFFFu) : LLAMA_DEFAULT_SEED;
        auto t = std::make_unique<task>();
        t->smpl = make_sampler(*model_, req.sampling, seed, info_.n_ctx_slot);
        t->spec = spec;
        t->lora = lora;
        t->stops = stop_matcher(req.stop);
        t->req = j + 1 == ids.size() ? std::move(req) : req;
        t->req.id_req = ids[j];
        out.tasks.push_back(std::move(t));
    }
    return out;
}

task_speculation engine::resolve_speculation(const speculative_override & o) const {
    task_speculation out;
    if (!spec_) {
        if (!o.type.empty() && o.type != "none") {
            throw invalid_request("speculative decoding is off on this server (start it with --spec-type or "
                                  "--model-draft)", "speculative");
        }
        return out;
    }
    out.types = spec_->default_types();
    if (!o.type.empty()) {
        if (o.type == "none") {
            out.types = 0;
        } else {
            const uint32_t bit = speculative_type_bit(o.type);
            if (bit == 0 || !(bit & spec_->available_types())) {
                std::string known = "none";
                for (const auto & n : speculative_type_names()) {
                    if (speculative_type_bit(n) & spec_->available_types()) known += ", " + n;
                }
                throw invalid_request("speculative.type '" + o.type + "' is not available here (" + known + ")",
                                      "speculative");
            }
            out.types = bit;
        }
    }
    // A draft longer than the server's --draft would not fit the output buffers: capped there.
    out.n_max = o.n_max >= 0 ? std::min(o.n_max, spec_->n_max()) : spec_->n_max();
    out.n_min = o.n_min >= 0 ? o.n_min : spec_->n_min();
    out.p_min = o.p_min >= 0 ? o.p_min : spec_->p_min();
    if (!(out.p_min <= 1.0f)) throw invalid_request("speculative.p_min must be in [0, 1]", "speculative");
    return out;
}

void engine::submit(prepared && p) {
    int32_t n_gen = 0, n_emb = 0;
    for (const auto & t : p.tasks) (t->req.kind == REQUEST_KIND_EMBEDDING ? n_emb : n_gen)++;
    if (const std::string why = failure(); !why.empty()) {
        throw engine_stopped(why);
    }
    std::lock_guard<std::mutex> lk(mtx_in_);
    if (stopping_) throw engine_stopped("the engine is stopped");
    if (n_gen > 0 && std::max(0, n_unassigned_ + n_gen - n_idle_) > params_.n_queue_max) {
        throw queue_full("all " + std::to_string(params_.n_parallel) + " slots are busy and " +
                         std::to_string(params_.n_queue_max) + " requests are waiting");
    }
    if (n_emb > 0 && n_emb_waiting_ + n_emb > params_.n_parallel + params_.n_queue_max) {
        throw queue_full(std::to_string(n_emb_waiting_) + " embedding inputs are waiting");
    }
    for (auto & t : p.tasks) inbox_.push_back(std::move(t));
    p.tasks.clear();
    n_unassigned_ += n_gen;
    n_emb_waiting_ += n_emb;
    cv_in_.notify_one();
}

void engine::post_job(uint64_t id_job, std::function<void(job_result &)> fn) {
    workers_->post([this, id_job, fn = std::move(fn)] {
        job_result r;
        r.id_job = id_job;
        try {
            fn(r);
        } catch (...) {
            r.error = std::current_exception();
        }
        std::lock_guard<std::mutex> lk(mtx_out_);
        jobs_done_.push_back(std::move(r));
        notify_locked();
    });
}

void engine::post_slot_action(uint64_t id_job, int32_t id_slot, slot_action action, std::string path) {
    {
        std::lock_guard<std::mutex> lk(mtx_in_);
        if (stopping_) throw engine_stopped("the engine is stopped");
        slot_ops_.push_back({id_job, id_slot, action, std::move(path)});
    }
    cv_in_.notify_one();
}

void engine::post_prepare(uint64_t id_job, request && req, std::vector<uint64_t> ids) {
    // std::function needs a copyable callable: the request travels in a shared_ptr.
    auto moved = std::make_shared<request>(std::move(req));
    post_job(id_job, [this, moved, ids = std::move(ids)](job_result & r) { r.prep = prepare(std::move(*moved), ids); });
}

void engine::post_tokenize(uint64_t id_job, std::string text, bool add_special, bool parse_special) {
    post_job(id_job, [this, text = std::move(text), add_special, parse_special](job_result & r) {
        r.tokens = tokenize(text, add_special, parse_special);
    });
}

void engine::post_detokenize(uint64_t id_job, std::vector<llama_token> tokens) {
    post_job(id_job, [this, tokens = std::move(tokens)](job_result & r) { r.text = detokenize(tokens); });
}

void engine::post_template(uint64_t id_job, std::string messages_json, bool add_generation_prompt) {
    post_job(id_job, [this, json = std::move(messages_json), add_generation_prompt](job_result & r) {
        r.text = apply_chat_template(json, add_generation_prompt);
    });
}

void engine::post_chat(uint64_t id_job, std::string inputs_json) {
    post_job(id_job, [this, json = std::move(inputs_json)](job_result & r) {
        r.chat = std::make_unique<chat_render>(apply_chat(json));
    });
}

std::vector<job_result> engine::poll_jobs() {
    std::vector<job_result> out;
    std::lock_guard<std::mutex> lk(mtx_out_);
    out.swap(jobs_done_);
    return out;
}

void engine::cancel(uint64_t id_req) {
    std::lock_guard<std::mutex> lk(mtx_in_);
    cancels_.push_back(id_req);
    cv_in_.notify_one();
}

std::vector<event> engine::poll_events() {
    std::vector<event> out;
    std::lock_guard<std::mutex> lk(mtx_out_);
    char buf[64];
    while (read(pipe_rd_, buf, sizeof(buf)) > 0) {}
    notified_ = false;
    out.swap(events_);
    return out;
}

engine_stats engine::stats() const {
    engine_stats out;
    {
        std::lock_guard<std::mutex> lk(mtx_stats_);
        out = stats_;
    }
    if (media_) {
        const media_stats m = media_->stats();
        out.n_media_inputs_total     = m.n_inputs;
        out.n_media_cache_hits_total = m.n_cache_hits;
        out.n_media_encoded_total    = m.n_encoded;
        out.t_media_encode_ms_total  = m.t_encode_ms;
        out.n_media_cache_entries    = m.n_cache_entries;
    }
    return out;
}

std::vector<llama_token> engine::tokenize(const std::string & text, bool add_special, bool parse_special) const {
    return model_->tokenize(text, add_special, parse_special);
}

std::string engine::detokenize(const std::vector<llama_token> & tokens) const { return model_->detokenize(tokens); }

std::string engine::token_piece(llama_token token) const { return model_->token_piece(token); }

std::string engine::apply_chat_template(const std::string & messages_json, bool add_generation_prompt) const {
    return model_->apply_chat_template(messages_json, add_generation_prompt);
}

chat_render engine::apply_chat(const std::string & inputs_json) const { return model_->apply_chat(inputs_json); }

std::vector<float> engine::lora_scales_of(const std::vector<std::pair<int32_t, float>> & pairs) const {
    if (loras_.empty() && !pairs.empty()) {
        throw invalid_request("this server has no LoRA adapters (start it with --lora FILE)", "lora");
    }
    std::vector<float> scales(loras_.size(), 0.0f);
    for (const auto & [id, scale] : pairs) {
        if (id < 0 || (size_t) id >= loras_.size()) {
            throw invalid_request("lora: adapter id " + std::to_string(id) + " is not one of the " +
                                  std::to_string(loras_.size()) + " loaded (GET /lora-adapters)", "lora");
        }
        if (!std::isfinite(scale)) throw invalid_request("lora: the scale of adapter " + std::to_string(id) + " is not finite", "lora");
        scales[(size_t) id] = scale;
    }
    return scales;
}

std::vector<float> engine::resolve_lora(const request & req) const {
    if (req.has_lora) return lora_scales_of(req.lora);
    std::lock_guard<std::mutex> lk(mtx_lora_);
    return lora_scales_;
}

std::vector<lora_adapter_info> engine::lora_adapters() const {
    std::lock_guard<std::mutex> lk(mtx_lora_);
    std::vector<lora_adapter_info> out;
    for (size_t i = 0; i < loras_.size(); ++i) out.push_back({(int32_t) i, lora_paths_[i], lora_scales_[i]});
    return out;
}

void engine::set_lora_scales(const std::vector<std::pair<int32_t, float>> & scales) {
    std::vector<float> all = lora_scales_of(scales);
    std::lock_guard<std::mutex> lk(mtx_lora_);
    lora_scales_ = std::move(all);
}

}  // namespace llamabox
