#include "embedder.h"

#include <algorithm>
#include <cmath>

#include "common.h"
#include "errors.h"
#include "log_sink.h"
#include "model.h"

namespace llamabox {

namespace {

void normalize(float * v, int32_t n) {
    double sum = 0.0;
    for (int32_t i = 0; i < n; ++i) sum += (double) v[i] * v[i];
    const float inv = sum > 0.0 ? (float) (1.0 / std::sqrt(sum)) : 0.0f;
    for (int32_t i = 0; i < n; ++i) v[i] *= inv;
}

}  // namespace

embedder::embedder(const model & m, const embedder_params & params)
    : n_tokens_max_(std::max(1, params.n_tokens_max)),
      n_seq_max_(std::clamp(params.n_seq_max, 1, 64)) {
    int32_t pooling = params.pooling;
    // A generative model names no pooling; mean pooling gives it usable sentence embeddings.
    const std::string arch = m.meta("general.architecture");
    if (pooling < 0 && m.meta((arch + ".pooling_type").c_str()).empty()) pooling = LLAMA_POOLING_TYPE_MEAN;

    auto cparams = llama_context_default_params();
    const int32_t n_threads = params.n_threads > 0 ? params.n_threads : common_cpu_get_num_math();
    cparams.n_ctx           = (uint32_t) n_tokens_max_;
    cparams.n_batch         = (uint32_t) n_tokens_max_;
    cparams.n_ubatch        = (uint32_t) n_tokens_max_;
    cparams.n_seq_max       = (uint32_t) n_seq_max_;
    cparams.kv_unified      = true;  // the inputs of one batch share the cells
    cparams.n_threads       = n_threads;
    cparams.n_threads_batch = n_threads;
    cparams.flash_attn_type = (llama_flash_attn_type) params.flash_attn;
    cparams.embeddings      = true;
    cparams.pooling_type    = static_cast<enum llama_pooling_type>(pooling);
    cparams.no_perf         = true;
    {
        log_capture capture;
        ctx_.reset(llama_init_from_model(m.get(), cparams));
        if (!ctx_) {
            throw load_error("failed to create the embedding context" +
                             (capture.errors().empty() ? std::string() : ": " + capture.errors()));
        }
    }
    if (!params.loras.empty()) {
        std::vector<llama_adapter_lora *> loras = params.loras;
        std::vector<float> scales = params.lora_scales;
        if (llama_set_adapters_lora(ctx_.get(), loras.data(), loras.size(), scales.data()) != 0) {
            throw load_error("failed to apply the LoRA adapters to the embedding context");
        }
    }
    pooling_ = (int32_t) ::llama_pooling_type(ctx_.get());
    n_embd_ = llama_model_n_embd_out(m.get());
    n_cls_out_ = (int32_t) llama_model_n_cls_out(m.get());
    batch_ = llama_batch_init(n_tokens_max_, 0, 1);
}

embedder::~embedder() { llama_batch_free(batch_); }

std::vector<embedder::result> embedder::run(const std::vector<const std::vector<llama_token> *> & inputs) {
    std::vector<result> out(inputs.size());
    batch_.n_tokens = 0;
    std::vector<int32_t> first(inputs.size());
    for (size_t s = 0; s < inputs.size(); ++s) {
        first[s] = batch_.n_tokens;
        const auto & p = *inputs[s];
        for (size_t i = 0; i < p.size(); ++i) {
            const int32_t j = batch_.n_tokens++;
            batch_.token[j] = p[i];
            batch_.pos[j] = (llama_pos) i;
            batch_.n_seq_id[j] = 1;
            batch_.seq_id[j][0] = (llama_seq_id) s;
            batch_.logits[j] = true;
        }
    }
    llama_memory_t mem = llama_get_memory(ctx_.get());
    const int32_t ret = llama_decode(ctx_.get(), batch_);
    if (ret != 0) {
        for (auto & r : out) r.error = "llama_decode failed with code " + std::to_string(ret);
    } else {
        for (size_t s = 0; s < inputs.size(); ++s) {
            result & r = out[s];
            const int32_t n = (int32_t) inputs[s]->size();
            if (pooling_ == LLAMA_POOLING_TYPE_RANK) {
                // The rank head's scores, raw (a relevance logit each): nothing to normalize.
                const float * e = llama_get_embeddings_seq(ctx_.get(), (llama_seq_id) s);
                if (!e) {
                    r.error = "llama.cpp gave no rank score for this input";
                    continue;
                }
                r.embedding.assign(e, e + n_cls_out_);
                r.n_rows = 1;
                continue;
            }
            if (pooling_ != LLAMA_POOLING_TYPE_NONE) {
                const float * e = llama_get_embeddings_seq(ctx_.get(), (llama_seq_id) s);
                if (!e) {
                    r.error = "llama.cpp gave no pooled embedding for this input";
                    continue;
                }
                r.embedding.assign(e, e + n_embd_);
                r.n_rows = 1;
            } else {
                r.embedding.resize((size_t) n * n_embd_);
                for (int32_t i = 0; i < n && r.error.empty(); ++i) {
                    const float * e = llama_get_embeddings_ith(ctx_.get(), first[s] + i);
                    if (!e) {
                        r.error = "llama.cpp gave no embedding for token " + std::to_string(i) + " of this input";
                        break;
                    }
                    std::copy(e, e + n_embd_, r.embedding.begin() + (size_t) i * n_embd_);
                }
                if (!r.error.empty()) {
                    r.embedding.clear();
                    continue;
                }
                r.n_rows = n;
            }
            for (int32_t row = 0; row < r.n_rows; ++row) normalize(r.embedding.data() + (size_t) row * n_embd_, n_embd_);
        }
    }
    if (mem) llama_memory_clear(mem, true);  // each batch starts from empty sequences
    return out;
}

}  // namespace llamabox
