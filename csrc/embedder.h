// Embeddings in a context of their own, so that an embedding request never takes a generation
// slot or evicts the prefix a conversation has cached there.
//
// Thread safety: constructed on the owning thread, then used by the engine thread alone.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "llama-cpp.h"

namespace llamabox {

class model;

struct embedder_params {
    int32_t n_tokens_max = 512;  // longest input (and the batch); inputs are never split
    int32_t n_seq_max    = 32;   // inputs per decode
    int32_t pooling      = -1;   // llama_pooling_type; -1 = the model's, or mean if it names none
    int32_t n_threads    = 0;
    int32_t flash_attn   = -1;
    // LoRA adapters and their scales, applied once: embeddings use the server's start-up scales
    std::vector<llama_adapter_lora *> loras;
    std::vector<float> lora_scales;
};

class embedder {
public:
    embedder(const model & m, const embedder_params & params);  // throws load_error
    ~embedder();
    embedder(const embedder &) = delete;
    embedder & operator=(const embedder &) = delete;

    int32_t n_tokens_max() const { return n_tokens_max_; }
    int32_t n_seq_max() const { return n_seq_max_; }
    int32_t pooling() const { return pooling_; }  // llama_pooling_type in use
    int32_t n_cls_out() const { return n_cls_out_; }  // scores per input under rank pooling

    struct result {
        std::vector<float> embedding;  // n_rows x n_embd, each row L2-normalized; rank: n_cls_out raw scores
        int32_t            n_rows = 0;
        std::string        error;      // non-empty: this input failed
    };
    // Embeds the inputs in one decode; the caller keeps their total within n_tokens_max() and
    // their number within n_seq_max().
    std::vector<result> run(const std::vector<const std::vector<llama_token> *> & inputs);

private:
    llama_context_ptr ctx_;
    llama_batch       batch_ {};
    int32_t n_tokens_max_ = 0;
    int32_t n_seq_max_    = 0;
    int32_t pooling_      = 0;
    int32_t n_embd_       = 0;
    int32_t n_cls_out_    = 0;
};

}  // namespace llamabox
