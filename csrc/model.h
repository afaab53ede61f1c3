// The model: loading, vocabulary, chat template, tokenize and detokenize.
//
// Thread safety: the constructor and destructor on the owning thread; every const method from
// any thread (llama.cpp's vocabulary is read-only after load; template rendering is serialized).
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "llama-cpp.h"
#include "request.h"


struct common_chat_templates;
struct common_chat_params;
struct common_chat_templates_inputs;

namespace llamabox {

struct model_params {
    std::string path;
    int32_t     n_gpu_layers  = -1;
    bool        use_mmap      = true;
    bool        use_mlock     = false;
    bool        repack        = true;
    std::string chat_template;  // a built-in name (chatml, llama3, ...), Jinja source, or empty
    std::vector<std::string> devices;  // backend device names to offload to; "none" = none; empty = default
    load_progress * progress = nullptr;  // updated while the weights load; may cancel it
};

class model {
public:
    explicit model(const model_params & params);  // throws load_error
    ~model();
    model(const model &) = delete;
    model & operator=(const model &) = delete;

    llama_model *       get() const { return model_.get(); }
    const llama_vocab * vocab() const { return vocab_; }
    int32_t             n_vocab() const { return n_vocab_; }
    std::string         meta(const char * key) const;  // GGUF metadata; empty if absent

    // Fills the model's part of `info` (the context's part is the engine's).
    void describe(model_info & info) const;

    std::vector<llama_token> tokenize(const std::string & text, bool add_special, bool parse_special) const;
    std::string detokenize(const std::vector<llama_token> & tokens) const;  // valid UTF-8
    // A rerank input: the query and one document in the layout the model was trained on.
    std::vector<llama_token> rerank_prompt(const std::string & query, const std::string & document) const;
    std::string token_piece(llama_token token) const;  // raw bytes, special tokens rendered
    void check_tokens(const std::vector<llama_token> & tokens, const char * what) const;  // throws invalid_request

    // messages: an OpenAI-style JSON array. Returns the prompt text, less a leading BOS text
    // (tokenizing with add_special puts the BOS token back). Throws invalid_request.
    std::string apply_chat_template(const std::string & messages_json, bool add_generation_prompt) const;
    // inputs: a JSON object, {"messages": [...], "tools", "tool_choice" ("none", "auto",
    // "required"), "parallel_tool_calls", "json_schema", "add_generation_prompt",
    // "reasoning_format", "enable_thinking", "chat_template_kwargs"}. Throws invalid_request.
    chat_render apply_chat(const std::string & inputs_json) const;
    const std::string & chat_template() const { return template_name_; }  // name or source in use

    bool is_eog(llama_token token) const { return llama_vocab_is_eog(vocab_, token); }
    // A -inf bias for every end-of-generation token (ignore_eos).
    const std::vector<std::pair<llama_token, float>> & eog_bias() const { return eog_bias_; }
    bool has_suppress_tokens() const { return has_suppress_; }

private:
    common_chat_params render(common_chat_templates_inputs & inputs) const;

    llama_model_ptr model_;
    const llama_vocab * vocab_ = nullptr;
    int32_t n_vocab_ = 0;
    std::shared_ptr<common_chat_templates> tmpls_;
    bool legacy_template_ = false;  // a built-in template name: llama.cpp's own renderer
    std::string template_name_;
    mutable std::mutex mtx_tmpl_;
    std::vector<std::pair<llama_token, float>> eog_bias_;
    bool has_suppress_ = false;
    // The first bytes of the control (and unknown) tokens' texts: a text with none of them
    // holds no such token, and tokenizes the same with parse_special off, which skips
    // llama.cpp's search for each of them (6,249 on Gemma 3: half its time on a short text).
    std::array<bool, 256> special_first_byte_ {};
};

// The ggml type of a KV cache type name (f16, q8_0, ...); throws load_error naming the choices.
ggml_type kv_cache_type(const std::string & name);

// The built-in chat template names llama.cpp knows (llama_chat_builtin_templates).
std::vector<std::string> builtin_chat_templates();

}  // namespace llamabox
