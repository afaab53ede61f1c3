// The parser that turns a model's answer back into content, reasoning and tool calls
// (llama.cpp's common_chat_parse, set up by the chat_render of model::apply_chat), streamed as
// deltas.
//
// Thread safety: a chat_parser belongs to one response and is used by one thread at a time.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "chat.h"
#include "request.h"

namespace llamabox {

// tool_choice "required" (or a named function) as OpenAI means it: the answer is the calls,
// after a reasoning section where the format has one. llama.cpp's grammar for "required" lets
// free text come first, which a small model can fill until its token limit without calling;
// this drops that text from the grammar's root rule. A grammar of another shape is returned as
// it is (the tests check every family's).
std::string require_call_grammar(const std::string & grammar);

// parallel_tool_calls false: some families' grammars (Hermes, Qwen) repeat the call anyway;
// this makes them take one. Returned as it is when it has no such rule.
std::string single_call_grammar(const std::string & grammar);

class chat_parser {
public:
    explicit chat_parser(const chat_render & render);

    // Adds generated text; `is_final` for the last call (the whole answer is then parsed
    // strictly). Returns what is new since the last call. An answer that does not parse at
    // the end becomes plain content.
    std::vector<chat_delta> push(const std::string & text, bool is_final);

    const chat_message & message() const { return msg_; }
    size_t size() const { return text_.size(); }  // bytes of answer pushed

private:
    common_chat_msg parse(bool is_final);
    std::string     new_call_id();

    common_chat_parser_params params_;
    std::string  text_;
    chat_message msg_;            // what has been parsed so far
    std::string  sent_content_;   // what the deltas have carried
    std::string  sent_reasoning_;
    std::vector<bool>        sent_name_;
    std::vector<std::string> sent_args_;
    size_t       max_calls_ = 1;  // parallel_tool_calls false: the first call alone
    std::mt19937_64 rng_;
};

}  // namespace llamabox
