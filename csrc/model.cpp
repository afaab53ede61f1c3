#include "model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>

#include "chat.h"
#include "chat_format.h"
#include "common.h"
#include "errors.h"
#include "input_limits.h"
#include "json.h"
#include "log_sink.h"
#include "templates.h"
#include "text.h"

namespace llamabox {

namespace {

// Refuses a path before llama.cpp sees it, with a message a user can act on.
void check_model_file(const std::string & path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw load_error("model file not found or unreadable: " + path);
    char magic[4] = {};
    f.read(magic, 4);
    if (f.gcount() != 4 || std::memcmp(magic, "GGUF", 4) != 0) {
        throw load_error("not a GGUF file: " + path);
    }
}

bool looks_like_jinja(const std::string & s) {
    return s.find("{{") != std::string::npos || s.find("{%") != std::string::npos;
}

std::string join(const std::vector<std::string> & items) {
    std::string out;
    for (const auto & s : items) out += (out.empty() ? "" : ", ") + s;
    return out;
}

}  // namespace

ggml_type kv_cache_type(const std::string & name) {
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const char * tn = ggml_type_name((ggml_type) t);
        if (tn && name == tn) return (ggml_type) t;
    }
    throw load_error("unknown KV cache type '" + name + "' (try f16, bf16, q8_0, q4_0)");
}

std::vector<std::string> builtin_chat_templates() {
    const int32_t n = llama_chat_builtin_templates(nullptr, 0);
    std::vector<const char *> names(n > 0 ? (size_t) n : 0);
    if (n > 0) llama_chat_builtin_templates(names.data(), names.size());
    return {names.begin(), names.end()};
}

model::model(const model_params & params) {
    check_model_file(params.path);

    auto mparams = llama_model_default_params();
    mparams.n_gpu_layers    = params.n_gpu_layers;
    mparams.use_extra_bufts = params.repack;
    mparams.load_mode = params.use_mmap ? (params.use_mlock ? LLAMA_LOAD_MODE_MMAP_MLOCK : LLAMA_LOAD_MODE_MMAP)
                                        : (params.use_mlock ? LLAMA_LOAD_MODE_MLOCK : LLAMA_LOAD_MODE_NONE);
    std::vector<ggml_backend_dev_t> devices;  // null-terminated, as llama.cpp wants it
    if (!params.devices.empty()) {
        for (const auto & name : params.devices) {
            if (name == "none") continue;
            ggml_backend_dev_t dev = ggml_backend_dev_by_name(name.c_str());
            if (!dev) {
                std::string known;
                for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
                    known += (known.empty() ? "" : ", ") + std::string(ggml_backend_dev_name(ggml_backend_dev_get(i)));
                }
                throw load_error("no backend device '" + name + "' (devices: " + known + ")");
            }
            devices.push_back(dev);
        }
        devices.push_back(nullptr);
        mparams.devices = devices.data();
    }
    if (params.progress != nullptr) {
        mparams.progress_callback = [](float p, void * user) {
            auto * progress = static_cast<load_progress *>(user);
            progress->value.store(p);
            return !progress->cancelled.load();
        };
        mparams.progress_callback_user_data = params.progress;
    }
    {
        log_capture capture;
        model_.reset(llama_model_load_from_file(params.path.c_str(), mparams));
        if (!model_ && params.progress != nullptr && params.progress->cancelled.load()) {
            throw load_error("the load of " + params.path + " was cancelled");
        }
        if (!model_) {
            const std::string & why = capture.errors();
            throw load_error("failed to load model " + params.path +
                             (why.empty() ? std::string(" (unsupported architecture or corrupt file)") : ": " + why));
        }
    }
    vocab_ = llama_model_get_vocab(model_.get());
    n_vocab_ = llama_vocab_n_tokens(vocab_);

    // Chat template: a built-in name, the user's Jinja, the model's, or a fallback by architecture.
    std::string src = params.chat_template;
    const auto builtins = builtin_chat_templates();
    const bool is_builtin = std::find(builtins.begin(), builtins.end(), src) != builtins.end();
    if (!src.empty() && !is_builtin && !looks_like_jinja(src)) {
        throw load_error("chat template '" + src + "' is neither a built-in template name (" + join(builtins) +
                         ") nor a Jinja template");
    }
    // chatml is a Jinja template of llama.cpp's own (common_chat_templates_init maps the name);
    // the other names only llama.cpp's built-in renderer knows.
    legacy_template_ = is_builtin && src != "chatml";
    if (src.empty() && !llama_model_chat_template(model_.get(), nullptr)) {
        src = fallback_chat_template(meta("general.architecture"));
    }
    try {
        tmpls_ = std::shared_ptr<common_chat_templates>(common_chat_templates_init(model_.get(), src).release(),
                                                        common_chat_templates_free);
    } catch (const std::exception & e) {
        throw load_error(std::string("invalid chat template: ") + e.what());
    }
    template_name_ = is_builtin ? src : common_chat_templates_source(tmpls_.get());
    if (legacy_template_) {
        // Render once now, so a template llama.cpp cannot apply fails the load, not a request.
        llama_chat_message probe = {"user", "test"};
        if (llama_chat_apply_template(src.c_str(), &probe, 1, true, nullptr, 0) < 0) {
            throw load_error("llama.cpp cannot apply the built-in chat template '" + src + "'");
        }
    }

    for (llama_token t = 0; t < n_vocab_; ++t) {
        if (llama_vocab_is_eog(vocab_, t)) eog_bias_.emplace_back(t, -INFINITY);
    }
    int32_t n_suppress = 0;
    llama_vocab_get_suppress_tokens(vocab_, &n_suppress);
    has_suppress_ = n_suppress > 0;
    for (llama_token t = 0; t < n_vocab_; ++t) {
        if (!(llama_vocab_get_attr(vocab_, t) & (LLAMA_TOKEN_ATTR_CONTROL | LLAMA_TOKEN_ATTR_UNKNOWN))) continue;
        const char * text = llama_vocab_get_text(vocab_, t);
        if (text && text[0] != '\0') special_first_byte_[(unsigned char) text[0]] = true;
    }
}

model::~model() {
    tmpls_.reset();
    model_.reset();
}

std::string model::meta(const char * key) const {
    char buf[256];
    const int32_t n = llama_model_meta_val_str(model_.get(), key, buf, sizeof(buf));
    return n < 0 ? std::string() : std::string(buf);
}

void model::describe(model_info & info) const {
    char desc[256];
    info.description   = llama_model_desc(model_.get(), desc, sizeof(desc)) > 0 ? desc : "";
    info.architecture  = meta("general.architecture");
    info.n_params      = llama_model_n_params(model_.get());
    info.size_bytes    = llama_model_size(model_.get());
    info.n_vocab       = n_vocab_;
    info.n_ctx_train   = llama_model_n_ctx_train(model_.get());
    info.n_embd        = llama_model_n_embd(model_.get());
    info.n_swa         = llama_model_n_swa(model_.get());
    info.chat_template = template_name_;
    info.chat_template_caps = legacy_template_ ? std::map<std::string, bool>{}
                                               : common_chat_templates_get_caps(tmpls_.get());
    if (!legacy_template_) {
        // Whether the template has a reasoning section: what rendering one user message says.
        common_chat_templates_inputs probe;
        common_chat_msg user;
        user.role       = "user";
        user.content    = "x";
        probe.messages  = {user};
        probe.use_jinja = true;
        bool thinking   = false;
        try {
            std::lock_guard<std::mutex> lk(mtx_tmpl_);
            thinking = common_chat_templates_apply(tmpls_.get(), probe).supports_thinking;
        } catch (const std::exception &) {  // a template that needs more: it fails on requests
        }
        info.chat_template_caps["supports_thinking"] = thinking;
    }
    info.fim_pre       = llama_vocab_fim_pre(vocab_);
    info.fim_suf       = llama_vocab_fim_suf(vocab_);
    info.fim_mid       = llama_vocab_fim_mid(vocab_);
    info.bos           = llama_vocab_bos(vocab_);
    info.eos           = llama_vocab_eos(vocab_);
    info.add_bos       = llama_vocab_get_add_bos(vocab_);
}

std::vector<llama_token> model::tokenize(const std::string & text, bool add_special, bool parse_special) const {
    if (parse_special) {
        parse_special = std::any_of(text.begin(), text.end(),
                                    [this](char c) { return special_first_byte_[(unsigned char) c]; });
    }
    return common_tokenize(vocab_, text, add_special, parse_special);
}

std::vector<llama_token> model::rerank_prompt(const std::string & query, const std::string & document) const {
    if (const char * tmpl = llama_model_chat_template(model_.get(), "rerank")) {
        // The model's own layout (Qwen3-Reranker's instruction, yes/no question...): each
        // placeholder filled in one pass, so a query holding "{document}" stays as written.
        const std::string src = tmpl;
        std::string text;
        size_t i = 0;
        while (i < src.size()) {
            if (src.compare(i, 7, "{query}") == 0) {
                text += query;
                i += 7;
            } else if (src.compare(i, 10, "{document}") == 0) {
                text += document;
                i += 10;
            } else {
                text += src[i++];
            }
        }
        return common_tokenize(vocab_, text, false, true);
    }
    // A cross-encoder's pair: [BOS] query [EOS] [SEP] document [EOS], as its vocabulary adds them.
    llama_token eos = llama_vocab_eos(vocab_);
    if (eos == LLAMA_TOKEN_NULL) eos = llama_vocab_sep(vocab_);
    std::vector<llama_token> out;
    if (llama_vocab_get_add_bos(vocab_)) out.push_back(llama_vocab_bos(vocab_));
    const auto q = common_tokenize(vocab_, query, false, false);
    out.insert(out.end(), q.begin(), q.end());
    if (llama_vocab_get_add_eos(vocab_) && eos != LLAMA_TOKEN_NULL) out.push_back(eos);
    if (llama_vocab_get_add_sep(vocab_)) out.push_back(llama_vocab_sep(vocab_));
    const auto d = common_tokenize(vocab_, document, false, false);
    out.insert(out.end(), d.begin(), d.end());
    if (llama_vocab_get_add_eos(vocab_) && eos != LLAMA_TOKEN_NULL) out.push_back(eos);
    return out;
}

void model::check_tokens(const std::vector<llama_token> & tokens, const char * what) const {
    for (llama_token t : tokens) {
        if (t < 0 || t >= n_vocab_) {
            throw invalid_request(std::string(what) + ": token id " + std::to_string(t) + " is out of range [0, " +
                                  std::to_string(n_vocab_) + ")", what);
        }
    }
}

std::string model::detokenize(const std::vector<llama_token> & tokens) const {
    check_tokens(tokens, "tokens");
    return utf8_sanitize(common_detokenize(vocab_, tokens, false));
}

std::string model::token_piece(llama_token token) const {
    check_tokens({token}, "tokens");
    return common_token_to_piece(vocab_, token, true);
}

namespace {

std::vector<common_chat_msg> parse_messages(const common_json & messages) {
    try {
        check_tool_call_arguments(messages);
        return common_chat_msgs_parse_oaicompat(messages);
    } catch (const invalid_request & e) {
        throw invalid_request(e.what(), e.param.empty() ? "messages" : e.param);
    } catch (const std::exception & e) {
        throw invalid_request(std::string("invalid messages: ") + e.what(), "messages");
    }
}

// A field of the chat inputs, read as T; a value of another type is the request's error.
template <typename T>
T field(const common_json & body, const char * name, T fallback) {
    if (!body.contains(name) || body.at(name).is_null()) return fallback;
    try {
        return body.at(name).get<T>();
    } catch (const std::exception &) {
        throw invalid_request(std::string(name) + " has the wrong type", name);
    }
}

}  // namespace

common_chat_params model::render(common_chat_templates_inputs & inputs) const {
    inputs.use_jinja = !legacy_template_;
    common_chat_params out;
    try {
        std::lock_guard<std::mutex> lk(mtx_tmpl_);
        out = common_chat_templates_apply(tmpls_.get(), inputs);
    } catch (const std::exception & e) {
        throw invalid_request(std::string("the chat template failed on these messages: ") + e.what(), "messages");
    }
    // The template writes BOS itself; tokenizing with add_special adds it again, so drop it here.
    const llama_token bos = llama_vocab_bos(vocab_);
    if (llama_vocab_get_add_bos(vocab_) && bos != LLAMA_TOKEN_NULL) {
        const std::string bos_text = common_token_to_piece(vocab_, bos, true);
        if (!bos_text.empty() && out.prompt.compare(0, bos_text.size(), bos_text) == 0) {
            out.prompt.erase(0, bos_text.size());
        }
    }
    return out;
}

std::string model::apply_chat_template(const std::string & messages_json, bool add_generation_prompt) const {
    common_chat_templates_inputs inputs;
    common_json messages;
    try {
        messages = common_json::parse(messages_json);
    } catch (const std::exception & e) {
        throw invalid_request(std::string("invalid messages: ") + e.what(), "messages");
    }
    inputs.messages = parse_messages(messages);
    inputs.add_generation_prompt = add_generation_prompt;
    return render(inputs).prompt;
}

chat_render model::apply_chat(const std::string & inputs_json) const {
    common_json body;
    try {
        body = common_json::parse(inputs_json);
    } catch (const std::exception & e) {
        throw invalid_request(std::string("invalid chat inputs: ") + e.what(), "messages");
    }
    if (!body.is_object() || !body.contains("messages")) throw invalid_request("messages are missing", "messages");
    common_chat_templates_inputs inputs;
    inputs.messages = parse_messages(body.at("messages"));
    if (body.contains("tools") && !body.at("tools").is_null()) {
        try {
            inputs.tools = common_chat_tools_parse_oaicompat(body.at("tools"));
        } catch (const std::exception & e) {
            throw invalid_request(std::string("invalid tools: ") + e.what(), "tools");
        }
    }
    if (!inputs.tools.empty() && legacy_template_) {
        throw invalid_request("the built-in chat template '" + template_name_ +
                              "' cannot present tools; serve with a Jinja template (--chat-template, "
                              "--chat-template-file or the model's own)", "tools");
    }
    try {
        inputs.tool_choice = common_chat_tool_choice_parse_oaicompat(field<std::string>(body, "tool_choice", "auto"));
    } catch (const std::invalid_argument &) {
        throw invalid_request("tool_choice must be none, auto, required or a named function", "tool_choice");
    }
    const auto caps = common_chat_templates_get_caps(tmpls_.get());
    const auto parallel = caps.find("supports_parallel_tool_calls");
    inputs.parallel_tool_calls = field<bool>(body, "parallel_tool_calls",
                                             parallel != caps.end() && parallel->second);
    if (body.contains("json_schema") && body.at("json_schema").is_object()) {
        inputs.json_schema = body.at("json_schema").dump();
    }
    inputs.add_generation_prompt = field<bool>(body, "add_generation_prompt", true);
    try {
        inputs.reasoning_format = common_reasoning_format_from_name(field<std::string>(body, "reasoning_format", "auto"));
    } catch (const std::runtime_error &) {
        throw invalid_request("reasoning_format must be none, auto, deepseek or deepseek-legacy", "reasoning_format");
    }
    inputs.enable_thinking = field<bool>(body, "enable_thinking", true);
    if (body.contains("chat_template_kwargs") && body.at("chat_template_kwargs").is_object()) {
        for (const auto & item : body.at("chat_template_kwargs").items()) {
            inputs.chat_template_kwargs[item.key()] = item.value().dump();
        }
    }

    const common_chat_params p = render(inputs);
    chat_render out;
    out.prompt            = p.prompt;
    out.grammar = inputs.tool_choice == COMMON_CHAT_TOOL_CHOICE_REQUIRED && !p.grammar_lazy
                      ? require_call_grammar(p.grammar)
                      : p.grammar;
    if (!inputs.parallel_tool_calls) out.grammar = single_call_grammar(out.grammar);
    out.parallel_tool_calls = inputs.parallel_tool_calls;
    out.grammar_lazy      = p.grammar_lazy;
    for (const auto & t : p.grammar_triggers) out.grammar_triggers.emplace_back((int32_t) t.type, t.value);
    out.preserved_tokens  = p.preserved_tokens;
    out.additional_stops  = p.additional_stops;
    out.generation_prompt = p.generation_prompt;
    out.format            = (int32_t) p.format;
    out.format_name       = common_chat_format_name(p.format);
    out.parser            = p.parser;
    out.supports_thinking = p.supports_thinking;
    out.parse_tool_calls  = !inputs.tools.empty() && inputs.tool_choice != COMMON_CHAT_TOOL_CHOICE_NONE;
    out.reasoning_format  = (int32_t) inputs.reasoning_format;
    out.parses = out.parse_tool_calls ||
                 (inputs.reasoning_format != COMMON_REASONING_FORMAT_NONE && p.supports_thinking);
    return out;
}

}  // namespace llamabox
