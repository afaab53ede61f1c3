#include "chat_format.h"

#include <algorithm>
#include <cstdint>
#include <exception>
#include <regex>
#include <sstream>

namespace llamabox {

namespace {

bool starts_with(const std::string & s, const std::string & prefix) {
    return s.size() >= prefix.size() && s.compare(0, prefix.size(), prefix) == 0;
}

// The part of `now` past what was sent, if `now` extends it (a parse that changed text already
// sent cannot be taken back, and sends nothing).
std::string extension(const std::string & sent, const std::string & now) {
    if (now.size() <= sent.size() || !starts_with(now, sent)) return {};
    return now.substr(sent.size());
}

// The grammar with the first rule (line) that `rule` matches rewritten to `replacement`; the
// grammar as it is when no rule matches.
std::string rewrite_rule(const std::string & grammar, const std::regex & rule, const char * replacement) {
    std::istringstream in(grammar);
    std::string out, line;
    bool changed = false;
    while (std::getline(in, line)) {
        if (!changed && std::regex_search(line, rule)) {
            line    = std::regex_replace(line, rule, replacement);
            changed = true;
        }
        out += line;
        out += '\n';
    }
    return changed ? out : grammar;
}

}  // namespace

std::string require_call_grammar(const std::string & grammar) {
    // llama.cpp's root rule ends in "<free text>? <the calls>": the free text is dropped.
    static const std::regex text_before_calls(R"(^(root ::= .*?)\s+until-[0-9]+\?(\s+tool-calls?)\s*$)");
    return rewrite_rule(grammar, text_before_calls, "$1$2");
}

std::string single_call_grammar(const std::string & grammar) {
    static const std::regex repeated_calls(R"(^tool-calls ::= \(tool-call space\)\+\s*$)");
    return rewrite_rule(grammar, repeated_calls, "tool-calls ::= tool-call space");
}

chat_parser::chat_parser(const chat_render & render) : rng_(std::random_device{}()) {
    params_.format               = (common_chat_format) render.format;
    params_.reasoning_format     = (common_reasoning_format) render.reasoning_format;
    params_.reasoning_in_content = false;
    params_.generation_prompt    = render.generation_prompt;
    params_.parse_tool_calls     = render.parse_tool_calls;
    max_calls_                   = render.parallel_tool_calls ? SIZE_MAX : 1;
    if (!render.parser.empty()) params_.parser.load(render.parser);
}

std::string chat_parser::new_call_id() {
    static const char alphabet[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    std::uniform_int_distribution<size_t> pick(0, sizeof(alphabet) - 2);
    // Nine letters and digits: the one shape every family's template takes back (Mistral's
    // refuses any other in the history); clients treat ids as opaque.
    std::string id;
    for (int i = 0; i < 9; ++i) id += alphabet[pick(rng_)];
    return id;
}

common_chat_msg chat_parser::parse(bool is_final) {
    try {
        return common_chat_parse(text_, !is_final, params_);
    } catch (const std::exception &) {
        if (!is_final) return {};  // not readable yet: wait for more text
        common_chat_msg plain;     // the model broke the format: its answer as it stands
        plain.content = text_;
        return plain;
    }
}

std::vector<chat_delta> chat_parser::push(const std::string & text, bool is_final) {
    text_ += text;
    const common_chat_msg parsed = parse(is_final);
    if (parsed.empty() && !is_final) return {};

    msg_.content           = parsed.content;
    msg_.reasoning_content = parsed.reasoning_content;
    std::vector<chat_tool_call> calls;
    for (size_t i = 0; i < std::min(parsed.tool_calls.size(), max_calls_); ++i) {
        const auto & c = parsed.tool_calls[i];
        std::string id = i < msg_.tool_calls.size() ? msg_.tool_calls[i].id : c.id;
        if (id.empty()) id = new_call_id();
        calls.push_back({std::move(id), c.name, c.arguments});
    }
    msg_.tool_calls = std::move(calls);

    std::vector<chat_delta> out;
    if (auto d = extension(sent_reasoning_, msg_.reasoning_content); !d.empty()) {
        chat_delta delta;
        delta.reasoning = std::move(d);
        out.push_back(std::move(delta));
        sent_reasoning_ = msg_.reasoning_content;
    }
    if (auto d = extension(sent_content_, msg_.content); !d.empty()) {
        chat_delta delta;
        delta.content = std::move(d);
        out.push_back(std::move(delta));
        sent_content_ = msg_.content;
    }
    const size_t n = msg_.tool_calls.size();
    if (sent_name_.size() < n) {
        sent_name_.resize(n, false);
        sent_args_.resize(n);
    }
    for (size_t i = 0; i < n; ++i) {
        const auto & call = msg_.tool_calls[i];
        chat_delta delta;
        delta.tool_index = (int32_t) i;
        if (!sent_name_[i]) {
            // A name is whole once its arguments have begun, a later call has, or the answer ended.
            const bool whole = !call.arguments.empty() || i + 1 < n || is_final;
            if (call.name.empty() || !whole) continue;
            delta.tool_id        = call.id;
            delta.tool_name      = call.name;
            delta.tool_arguments = call.arguments;
            sent_name_[i] = true;
            sent_args_[i] = call.arguments;
            out.push_back(std::move(delta));
        } else if (auto d = extension(sent_args_[i], call.arguments); !d.empty()) {
            delta.tool_arguments = std::move(d);
            sent_args_[i]        = call.arguments;
            out.push_back(std::move(delta));
        }
    }
    return out;
}

}  // namespace llamabox
