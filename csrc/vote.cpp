// Answer normalization and majority voting; the rules are documented in fastjudge/core/voting.py and
// must stay identical to normalize_answer / majority_vote_reference there.
//
// Strings are handled as UTF-8 bytes. Every character the rules look at is ASCII, except the curly
// quotes, which are matched as whole 3-byte sequences; UTF-8 never reuses ASCII bytes inside a
// multi-byte character, so byte-wise work gives the same answer as the Python code on characters.
#include "vote.h"

#include <string_view>

namespace fastjudge {
namespace {

using std::string_view;

// ASCII white space only (Python's str.isspace also knows Unicode spaces; core/voting.py uses this list).
constexpr bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}
constexpr bool is_trailing_punct(char c) {
  return c == '.' || c == ',' || c == ';' || c == ':' || c == '!' || c == '?';
}
constexpr bool is_digit(char c) { return c >= '0' && c <= '9'; }
constexpr bool is_lower(char c) { return c >= 'a' && c <= 'z'; }

// Answers are short: a byte loop the compiler inlines beats a call to memcmp (profiled).
inline bool same_bytes(const char* a, const char* b, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (a[i] != b[i]) return false;
  }
  return true;
}
inline bool equals(string_view a, string_view b) {
  return a.size() == b.size() && same_bytes(a.data(), b.data(), a.size());
}
inline bool starts_with(string_view s, string_view prefix) {
  return s.size() >= prefix.size() && same_bytes(s.data(), prefix.data(), prefix.size());
}
inline bool ends_with(string_view s, string_view suffix) {
  return s.size() >= suffix.size() &&
         same_bytes(s.data() + s.size() - suffix.size(), suffix.data(), suffix.size());
}

// Grows `buffer` to at least n bytes; it never shrinks, so steady state allocates nothing.
char* reserve_bytes(std::string& buffer, size_t n) {
  if (buffer.size() < n) buffer.resize(2 * n);
  return buffer.data();
}

// Lowercases ASCII letters and collapses each run of white space into one space; the result lives
// in `buffer`.
string_view lower_and_collapse(string_view in, std::string& buffer) {
  char* const begin = reserve_bytes(buffer, in.size());  // the result is never longer
  char* dst = begin;
  bool in_space = false;
  for (char c : in) {
    if (is_space(c)) {
      if (!in_space) *dst++ = ' ';
      in_space = true;
    } else {
      in_space = false;
      *dst++ = (c >= 'A' && c <= 'Z') ? static_cast<char>(c + ('a' - 'A')) : c;
    }
  }
  return string_view(begin, static_cast<size_t>(dst - begin));
}

string_view strip_space(string_view s) {
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

string_view rstrip_punct(string_view s) {
  while (!s.empty() && is_trailing_punct(s.back())) s.remove_suffix(1);
  return s;
}

// (open, close) quote pairs; the curly ones are U+201C/U+201D and U+2018/U+2019 in UTF-8.
constexpr string_view kQuotes[][2] = {
    {"\"", "\""},
    {"'", "'"},
    {"\xE2\x80\x9C", "\xE2\x80\x9D"},
    {"\xE2\x80\x98", "\xE2\x80\x99"},
};

// Removes one pair of surrounding quotes, only when the inside holds neither quote character:
// '"a" or "b"' must not become 'a" or "b'.
string_view strip_quote_pair(string_view s) {
  for (const auto& pair : kQuotes) {
    const string_view open = pair[0], close = pair[1];
    if (s.size() < open.size() + close.size() || !starts_with(s, open) || !ends_with(s, close)) continue;
    const string_view inner = s.substr(open.size(), s.size() - open.size() - close.size());
    if (inner.find(open) == string_view::npos && inner.find(close) == string_view::npos) return inner;
  }
  return s;
}

// Removes one pair of surrounding brackets, only when the first bracket closes at the last
// character: "(a)" -> "a", but "(a) or (b)" stays.
string_view strip_bracket_pair(string_view s) {
  if (s.size() < 2) return s;
  const char open = s.front();
  char close;
  switch (open) {
    case '(': close = ')'; break;
    case '[': close = ']'; break;
    case '{': close = '}'; break;
    default: return s;
  }
  if (s.back() != close) return s;
  int64_t depth = 0;
  for (size_t i = 0; i + 1 < s.size(); ++i) {
    if (s[i] == open) {
      ++depth;
    } else if (s[i] == close && --depth == 0) {
      return s;  // the first bracket closed before the end
    }
  }
  return depth == 1 ? s.substr(1, s.size() - 2) : s;
}

// Applies the stripping rules until nothing changes (they only ever shorten the text).
string_view strip_all(string_view s) {
  while (true) {
    const size_t before = s.size();
    s = strip_space(s);
    s = rstrip_punct(s);
    s = strip_quote_pair(s);
    s = strip_bracket_pair(s);
    if (s.size() == before) return s;
  }
}

// "b" or "b)" -> 'b'; anything else -> 0.
char option_letter(string_view s) {
  if (s.size() == 1 && is_lower(s[0])) return s[0];
  if (s.size() == 2 && is_lower(s[0]) && s[1] == ')') return s[0];
  return 0;
}

struct NumberWord {
  string_view word;
  const char* digits;
};
// Grouped by first letter so a lookup only compares against a few candidates (this is a hot path).
constexpr NumberWord kNumberWords[] = {
    {"eight", "8"},      {"eleven", "11"},   {"eighteen", "18"},  {"five", "5"},       {"four", "4"},
    {"fourteen", "14"},  {"fifteen", "15"},  {"nine", "9"},       {"nineteen", "19"},  {"one", "1"},
    {"six", "6"},        {"seven", "7"},     {"sixteen", "16"},   {"seventeen", "17"}, {"two", "2"},
    {"three", "3"},      {"ten", "10"},      {"twelve", "12"},    {"thirteen", "13"},  {"twenty", "20"},
    {"zero", "0"},
};

// Digits of a number word zero..twenty, or nullptr.
const char* number_word(string_view s) {
  if (s.size() < 3 || s.size() > 9) return nullptr;
  int begin = 0, end = 0;  // the candidates in kNumberWords
  switch (s[0]) {
    case 'e': begin = 0, end = 3; break;
    case 'f': begin = 3, end = 7; break;
    case 'n': begin = 7, end = 9; break;
    case 'o': begin = 9, end = 10; break;
    case 's': begin = 10, end = 14; break;
    case 't': begin = 14, end = 20; break;
    case 'z': begin = 20, end = 21; break;
    default: return nullptr;
  }
  for (int i = begin; i < end; ++i) {
    if (equals(s, kNumberWords[i].word)) return kNumberWords[i].digits;
  }
  return nullptr;
}

// Matches [+-]? (digits | 1-3 digits (,3 digits)+)? (. digits)? with at least one digit, and
// writes the canonical form: no '+', no thousands commas, no leading zeros in the whole part,
// no trailing zeros in the fraction, no '.' without a fraction, "-0" -> "0".
std::optional<string_view> canonical_number(string_view s, std::string& buffer) {
  size_t i = 0;
  bool negative = false;
  if (i < s.size() && (s[i] == '+' || s[i] == '-')) {
    negative = s[i] == '-';
    ++i;
  }
  const size_t whole_begin = i;
  bool has_comma = false;
  while (i < s.size() && (is_digit(s[i]) || s[i] == ',')) {
    has_comma |= s[i] == ',';
    ++i;
  }
  const string_view whole = s.substr(whole_begin, i - whole_begin);
  if (has_comma) {
    // Thousands groups: first group 1-3 digits, every later group exactly 3.
    size_t group_begin = 0;
    bool first = true;
    while (true) {
      const size_t comma = whole.find(',', group_begin);
      const size_t len = (comma == string_view::npos ? whole.size() : comma) - group_begin;
      if (first ? (len < 1 || len > 3) : len != 3) return std::nullopt;
      if (comma == string_view::npos) break;
      group_begin = comma + 1;
      first = false;
    }
  }
  string_view frac;
  if (i < s.size() && s[i] == '.') {
    const size_t frac_begin = ++i;
    while (i < s.size() && is_digit(s[i])) ++i;
    frac = s.substr(frac_begin, i - frac_begin);
    if (frac.empty()) return std::nullopt;
  }
  if (i != s.size() || (whole.empty() && frac.empty())) return std::nullopt;

  while (!frac.empty() && frac.back() == '0') frac.remove_suffix(1);
  char* const begin = reserve_bytes(buffer, s.size() + 1);  // at most one byte longer: ".5" -> "0.5"
  char* dst = begin;
  if (negative) *dst++ = '-';
  bool leading = true;
  for (char c : whole) {
    if (c == ',' || (leading && c == '0')) continue;  // thousands commas, leading zeros
    leading = false;
    *dst++ = c;
  }
  if (leading) {
    if (frac.empty()) return string_view("0");  // also "-0", "-0.000"
    *dst++ = '0';
  }
  if (!frac.empty()) {
    *dst++ = '.';
    for (char c : frac) *dst++ = c;
  }
  return string_view(begin, static_cast<size_t>(dst - begin));
}

}  // namespace

std::optional<string_view> normalize_answer_view(string_view text, NormalizeScratch& scratch) {
  // Views of one-letter keys; option letters and number words need no buffer.
  static constexpr string_view kLetters = "abcdefghijklmnopqrstuvwxyz";
  const string_view s = strip_all(lower_and_collapse(text, scratch.text));
  if (s.empty()) return std::nullopt;

  if (const char letter = option_letter(s)) return kLetters.substr(letter - 'a', 1);
  constexpr string_view kOption = "option ";
  if (starts_with(s, kOption)) {
    if (const char letter = option_letter(strip_all(s.substr(kOption.size())))) {
      return kLetters.substr(letter - 'a', 1);
    }
  }
  if (const char* digits = number_word(s)) return string_view(digits);
  if (const auto number = canonical_number(s, scratch.number)) return number;
  return s;
}

std::optional<std::string> normalize_answer(string_view text) {
  NormalizeScratch scratch;
  const std::optional<string_view> key = normalize_answer_view(text, scratch);
  if (!key) return std::nullopt;
  return std::string(*key);
}

namespace {

// FNV-1a: keys are a few bytes, where this beats word-at-a-time hashes (profiled). Not meant for
// adversarial input; a collision only costs an extra probe.
uint64_t hash_key(string_view key) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (const char c : key) h = (h ^ static_cast<unsigned char>(c)) * 0x100000001B3ull;
  return h;
}

// Finds a prompt's keys by hash: an open-addressing table of key indices, rebuilt per prompt. A
// linear scan over the keys was slower even at N = 16: which key matches is random, so the scan's
// branches mispredict, while the table's first probe almost always hits.
class KeyTable {
 public:
  // Empties the table for a new prompt.
  void clear() {
    hashes_.clear();
    slots_.assign(kMinSlots, -1);
  }
  // The index of the key equal to `key` (whose hash is h), or -1; `out` holds the keys, this
  // prompt's starting at first_key.
  int32_t find(string_view key, uint64_t h, const BatchVotes& out, size_t first_key) const {
    const size_t mask = slots_.size() - 1;
    for (size_t slot = first_slot(h); slots_[slot] >= 0; slot = (slot + 1) & mask) {
      const int32_t k = slots_[slot];
      if (hashes_[k] == h && equals(out.key(static_cast<int64_t>(first_key + k)), key)) return k;
    }
    return -1;
  }
  // Adds the next key (index = number of keys so far), growing to keep the table at most half full.
  void add(uint64_t h) {
    hashes_.push_back(h);
    if (2 * hashes_.size() > slots_.size()) {
      slots_.assign(2 * slots_.size(), -1);
      for (size_t k = 0; k < hashes_.size(); ++k) place(static_cast<int32_t>(k));
    } else {
      place(static_cast<int32_t>(hashes_.size() - 1));
    }
  }

 private:
  static constexpr size_t kMinSlots = 32;  // a power of two
  // FNV's low bits only see the bytes' low bits; fold the high half in.
  size_t first_slot(uint64_t h) const {
    return static_cast<size_t>(h ^ (h >> 32)) & (slots_.size() - 1);
  }
  void place(int32_t k) {
    const size_t mask = slots_.size() - 1;
    size_t slot = first_slot(hashes_[k]);
    while (slots_[slot] >= 0) slot = (slot + 1) & mask;
    slots_[slot] = k;
  }
  std::vector<uint64_t> hashes_;  // (G_b,) hash of each of the prompt's keys
  std::vector<int32_t> slots_;    // key index or -1; size is a power of two
};

struct VoteScratch {
  NormalizeScratch normalize;
  KeyTable table;
};

// Appends the vote of prompt b to `out`.
void vote_prompt(const AnswerBatch& batch, size_t b, int64_t min_votes, VoteScratch& scratch,
                 BatchVotes& out) {
  const size_t first_key = out.counts.size();
  const int64_t first_answer = batch.prompt_begin[b];
  const int64_t num_answers = batch.prompt_begin[b + 1] - first_answer;
  KeyTable& table = scratch.table;
  table.clear();

  for (int64_t j = 0; j < num_answers; ++j) {
    const int64_t i = first_answer + j;
    const std::optional<string_view> normalized =
        batch.present[i] ? normalize_answer_view(batch.answer(i), scratch.normalize) : std::nullopt;
    if (!normalized) {
      out.group_of.push_back(-1);
      continue;
    }
    const uint64_t h = hash_key(*normalized);
    int32_t g = table.find(*normalized, h, out, first_key);
    if (g < 0) {
      g = static_cast<int32_t>(out.counts.size() - first_key);
      out.key_bytes.append(*normalized);
      out.key_end.push_back(static_cast<int64_t>(out.key_bytes.size()));
      out.counts.push_back(0);
      table.add(h);
    }
    ++out.counts[first_key + g];
    out.group_of.push_back(g);
  }

  int64_t winner = -1, top = 0;
  bool tied = false;
  for (size_t k = 0; first_key + k < out.counts.size(); ++k) {
    const int64_t count = out.counts[first_key + k];
    if (count > top) {
      top = count;
      winner = static_cast<int64_t>(k);
      tied = false;
    } else if (count == top) {
      tied = true;
    }
  }
  out.winner.push_back(tied || top < min_votes ? -1 : winner);
  out.key_begin.push_back(static_cast<int64_t>(out.counts.size()));
}

}  // namespace

BatchVotes vote_batch(const AnswerBatch& batch, int64_t min_votes) {
  BatchVotes out;
  const size_t num_prompts = batch.num_prompts();
  out.key_begin.reserve(num_prompts + 1);
  out.winner.reserve(num_prompts);
  out.group_of.reserve(batch.present.size());
  VoteScratch scratch;
  for (size_t b = 0; b < num_prompts; ++b) vote_prompt(batch, b, min_votes, scratch, out);
  return out;
}

}  // namespace fastjudge
