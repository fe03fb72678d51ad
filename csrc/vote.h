// Answer normalization and majority voting over N sampled answers per prompt.
//
// Plain C++17, no Python headers: the binding (bindings.cpp) converts Python lists into
// AnswerBatch chunks, calls vote_batch on them without the GIL, and builds the Python result.
// The pure-Python reference in fastjudge/core/voting.py implements the same rules and is the test oracle.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace fastjudge {

// The sampled answers of a batch of prompts, (B, N_b), flat like cu_seqlens in varlen attention:
// two buffers for the whole batch instead of a vector and strings per prompt.
//   prompt b owns answers [prompt_begin[b], prompt_begin[b + 1])
//   answer i is text[text_begin[i], text_begin[i + 1]), or unparsed (None) when !present[i]
struct AnswerBatch {
  std::string text;                      // every answer's UTF-8 bytes, concatenated
  std::vector<int64_t> text_begin{0};    // (sum N_b + 1,)
  std::vector<int64_t> prompt_begin{0};  // (B + 1,)
  std::vector<uint8_t> present;          // (sum N_b,)

  void add_answer(std::string_view answer) {
    text.append(answer);
    text_begin.push_back(static_cast<int64_t>(text.size()));
    present.push_back(1);
  }
  void add_missing() {
    text_begin.push_back(static_cast<int64_t>(text.size()));
    present.push_back(0);
  }
  void end_prompt() { prompt_begin.push_back(static_cast<int64_t>(present.size())); }

  size_t num_prompts() const { return prompt_begin.size() - 1; }
  std::string_view answer(int64_t i) const {
    return std::string_view(text).substr(text_begin[i], text_begin[i + 1] - text_begin[i]);
  }
};

// Canonical form of a final answer, or nullopt when nothing is left after normalization.
// Input and output are UTF-8; only ASCII letters are lowercased (rules: fastjudge/core/voting.py).
std::optional<std::string> normalize_answer(std::string_view text);

// Reusable buffers for normalize_answer_view.
struct NormalizeScratch {
  std::string text, number;
};

// Allocation-free variant for hot loops. The view points into `scratch` or static storage and
// stays valid until the next call with the same scratch.
std::optional<std::string_view> normalize_answer_view(std::string_view text, NormalizeScratch& scratch);

// The votes of a batch of prompts, (B,), in flat arrays: a handful of allocations for the whole
// batch instead of several per prompt (those dominated the time at N = 16).
//   prompt b owns keys [key_begin[b], key_begin[b + 1]), in order of first appearance
//   group_of and winner hold key indices relative to the prompt's first key; -1 = none
//   group_of is aligned with the AnswerBatch's answers
struct BatchVotes {
  std::vector<int64_t> key_begin{0};  // (B + 1,)
  std::vector<int64_t> key_end;       // (G,) key g is key_bytes[g ? key_end[g - 1] : 0, key_end[g])
  std::string key_bytes;              // the normalized keys, concatenated
  std::vector<int64_t> counts;        // (G,) how many answers normalized to key g
  std::vector<int32_t> group_of;      // (sum N_b,) each answer's key; -1 when the answer is ignored
  std::vector<int64_t> winner;        // (B,) the winning key; -1 when tied, too few votes or empty

  size_t num_prompts() const { return winner.size(); }
  std::string_view key(int64_t g) const {
    const int64_t begin = g > 0 ? key_end[g - 1] : 0;
    return std::string_view(key_bytes).substr(begin, key_end[g] - begin);
  }
};

// Votes over every prompt of the batch, on the calling thread (the binding runs chunks of a batch
// on several threads). None answers and answers that normalize to nothing are ignored; the winner
// is the key with the top count, none when that count is tied or below min_votes (>= 1, checked by
// the caller).
BatchVotes vote_batch(const AnswerBatch& batch, int64_t min_votes);

}  // namespace fastjudge
