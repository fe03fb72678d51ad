// Python binding of the voting core (module fastjudge._C).
//
// Checks arguments (each error names the argument), copies the Python strings into C++ while
// holding the GIL, votes without the GIL, then builds the Python result.
//
// Why a pipeline: at N = 16 answers per prompt, reading the Python strings and building the result
// (dicts, lists, Vote objects) cost about as much as the voting itself, and they need the GIL.
// So the batch is cut into chunks: this thread converts every chunk, then builds the results chunk
// by chunk, while worker threads vote on chunks that are converted. When the next chunk to build is
// not voted yet, this thread releases the GIL and votes on a chunk itself.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>

#include "sample.h"
#include "vote.h"

namespace py = pybind11;

namespace {

std::string type_name(PyObject* obj) {
  return py::str(py::type::handle_of(py::handle(obj)).attr("__name__"));
}

// The UTF-8 bytes of a str, valid while the str (and `keep`) live. Lone surrogates are legal in a
// Python str but not in UTF-8; "surrogatepass" keeps them as opaque bytes (in `keep`), so C++ sees
// the same characters as the pure-Python reference.
std::string_view utf8_of(PyObject* str, py::object& keep) {
  if (PyUnicode_IS_COMPACT_ASCII(str)) {  // the common case: the str's own bytes are its UTF-8
    return std::string_view(static_cast<const char*>(PyUnicode_DATA(str)),
                            static_cast<size_t>(PyUnicode_GET_LENGTH(str)));
  }
  Py_ssize_t size = 0;
  if (const char* data = PyUnicode_AsUTF8AndSize(str, &size)) {
    return std::string_view(data, static_cast<size_t>(size));
  }
  PyErr_Clear();
  keep = py::reinterpret_steal<py::object>(PyUnicode_AsEncodedString(str, "utf-8", "surrogatepass"));
  if (!keep) throw py::error_already_set();
  return std::string_view(PyBytes_AS_STRING(keep.ptr()), static_cast<size_t>(PyBytes_GET_SIZE(keep.ptr())));
}

py::object from_utf8(std::string_view s) {
  PyObject* obj = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "surrogatepass");
  if (obj == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(obj);
}

py::object from_int(int64_t value) {
  PyObject* obj = PyLong_FromLongLong(value);
  if (obj == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(obj);
}

bool is_sequence(PyObject* obj) { return PyList_Check(obj) || PyTuple_Check(obj); }

[[noreturn]] void throw_bad_item(Py_ssize_t b, Py_ssize_t j, PyObject* item) {
  throw py::type_error("answers[" + std::to_string(b) + "][" + std::to_string(j) +
                       "] must be str or None, got " + type_name(item));
}

// answers must be a list (or tuple) of lists (or tuples) of str | None; the messages, and which error
// comes first (row-major order), match fastjudge/core/voting.py. Items are checked while converting.
PyObject* check_answers(py::handle answers) {
  PyObject* outer = answers.ptr();
  if (!is_sequence(outer)) {
    throw py::type_error("answers must be a list of lists of str or None, got " + type_name(outer));
  }
  const Py_ssize_t num_prompts = PySequence_Fast_GET_SIZE(outer);
  for (Py_ssize_t b = 0; b < num_prompts; ++b) {
    PyObject* row = PySequence_Fast_GET_ITEM(outer, b);
    if (is_sequence(row)) continue;
    // A bad item in an earlier row comes first.
    for (Py_ssize_t r = 0; r < b; ++r) {
      PyObject* earlier = PySequence_Fast_GET_ITEM(outer, r);
      for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(earlier); ++j) {
        PyObject* item = PySequence_Fast_GET_ITEM(earlier, j);
        if (item != Py_None && !PyUnicode_Check(item)) throw_bad_item(r, j, item);
      }
    }
    throw py::type_error("answers[" + std::to_string(b) + "] must be a list of str or None, got " +
                         type_name(row));
  }
  return outer;
}

// Copies prompts [begin, end) of answers into an AnswerBatch. A copy, not views into the Python
// strings: once the GIL is released, another Python thread could mutate the lists and free them.
fastjudge::AnswerBatch to_batch(PyObject* outer, Py_ssize_t begin, Py_ssize_t end) {
  size_t num_answers = 0;
  for (Py_ssize_t b = begin; b < end; ++b) {
    num_answers += static_cast<size_t>(PySequence_Fast_GET_SIZE(PySequence_Fast_GET_ITEM(outer, b)));
  }
  fastjudge::AnswerBatch batch;
  batch.prompt_begin.reserve(static_cast<size_t>(end - begin) + 1);
  batch.text_begin.reserve(num_answers + 1);
  batch.present.reserve(num_answers);
  batch.text.reserve(8 * num_answers);  // a guess: most final answers are short
  for (Py_ssize_t b = begin; b < end; ++b) {
    PyObject* row = PySequence_Fast_GET_ITEM(outer, b);
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(row);
    for (Py_ssize_t j = 0; j < n; ++j) {
      PyObject* item = PySequence_Fast_GET_ITEM(row, j);
      if (item == Py_None) {
        batch.add_missing();
      } else if (PyUnicode_Check(item)) {
        py::object keep;
        batch.add_answer(utf8_of(item, keep));
      } else {
        throw_bad_item(b, j, item);
      }
    }
    batch.end_prompt();
  }
  return batch;
}

// min_votes: int >= 1. Values past int64 behave like "never enough votes".
int64_t to_min_votes(py::handle min_votes) {
  if (!PyLong_Check(min_votes.ptr())) {
    throw py::type_error("min_votes must be an int, got " + type_name(min_votes.ptr()));
  }
  int overflow = 0;
  int64_t value = PyLong_AsLongLongAndOverflow(min_votes.ptr(), &overflow);
  if (overflow > 0) value = std::numeric_limits<int64_t>::max();
  if (overflow < 0 || value < 1) {
    throw py::value_error("min_votes must be >= 1, got " + std::string(py::str(min_votes)));
  }
  return value;
}

// Turns the cyclic garbage collector off for its lifetime (if it was on). Building 10k results
// allocates ~100k lists and dicts, each allocation counting towards a collection; those collections
// scan every young object, cannot free any of ours, and cost more than the building itself.
// (While this thread waits for votes without the GIL, other Python threads also run without it.)
class GcPause {
 public:
  GcPause() : was_enabled_(PyGC_Disable() == 1) {}
  ~GcPause() {
    if (was_enabled_) PyGC_Enable();
  }
  GcPause(const GcPause&) = delete;
  GcPause& operator=(const GcPause&) = delete;

 private:
  bool was_enabled_;
};

// Builds one result: a `vote_type` instance when given, else a (winner, counts, indices) tuple.
// vote_type is a frozen dataclass (fastjudge.core.voting.Vote). Its generated __init__ only calls
// object.__setattr__ per field; doing the same here skips three interpreter frames per prompt.
class ResultBuilder {
 public:
  explicit ResultBuilder(py::handle vote_type) : vote_type_(vote_type) {
    if (vote_type_.is_none()) return;
    // Only plain classes: object.__new__ on, say, int would build a broken object.
    if (!PyType_Check(vote_type_.ptr()) ||
        reinterpret_cast<PyTypeObject*>(vote_type_.ptr())->tp_new != PyBaseObject_Type.tp_new) {
      throw py::type_error("vote_type must be a plain class such as a dataclass, got " +
                           std::string(py::repr(vote_type_)));
    }
    names_[0] = py::reinterpret_steal<py::object>(PyUnicode_InternFromString("winner"));
    names_[1] = py::reinterpret_steal<py::object>(PyUnicode_InternFromString("counts"));
    names_[2] = py::reinterpret_steal<py::object>(PyUnicode_InternFromString("indices"));
  }

  py::object build(py::handle winner, py::handle counts, py::handle indices) const {
    if (vote_type_.is_none()) {
      PyObject* tuple = PyTuple_Pack(3, winner.ptr(), counts.ptr(), indices.ptr());
      if (tuple == nullptr) throw py::error_already_set();
      return py::reinterpret_steal<py::object>(tuple);
    }
    auto* type = reinterpret_cast<PyTypeObject*>(vote_type_.ptr());
    auto obj = py::reinterpret_steal<py::object>(PyBaseObject_Type.tp_new(type, empty_args_.ptr(), nullptr));
    if (!obj) throw py::error_already_set();
    const py::handle values[3] = {winner, counts, indices};
    for (int i = 0; i < 3; ++i) {
      if (PyObject_GenericSetAttr(obj.ptr(), names_[i].ptr(), values[i].ptr()) != 0) {
        throw py::error_already_set();
      }
    }
    return obj;
  }

 private:
  py::handle vote_type_;
  py::tuple empty_args_;  // ()
  py::object names_[3];
};

// Buffers reused across prompts by to_python (three small allocations per prompt add up).
struct BuildScratch {
  std::vector<PyObject*> keys;   // borrowed: owned by the counts dict
  std::vector<PyObject*> lists;  // borrowed: owned by the indices dict
  std::vector<Py_ssize_t> filled;
};

// The result of prompt b of a chunk; winner is the same str object as its dict key.
py::object to_python(const fastjudge::AnswerBatch& batch, const fastjudge::BatchVotes& votes, size_t b,
                     const ResultBuilder& builder, BuildScratch& scratch) {
  const int64_t first_key = votes.key_begin[b];
  const size_t num_keys = static_cast<size_t>(votes.key_begin[b + 1] - first_key);
  py::dict counts, indices;
  scratch.keys.resize(num_keys);
  scratch.lists.resize(num_keys);
  for (size_t g = 0; g < num_keys; ++g) {
    const int64_t count = votes.counts[first_key + g];
    const py::object key = from_utf8(votes.key(first_key + static_cast<int64_t>(g)));
    const auto list = py::reinterpret_steal<py::object>(PyList_New(static_cast<Py_ssize_t>(count)));
    if (!list) throw py::error_already_set();
    if (PyDict_SetItem(counts.ptr(), key.ptr(), from_int(count).ptr()) != 0 ||
        PyDict_SetItem(indices.ptr(), key.ptr(), list.ptr()) != 0) {
      throw py::error_already_set();
    }
    scratch.keys[g] = key.ptr();
    scratch.lists[g] = list.ptr();
  }
  // Fill each list in answer order, so the indices come out ascending.
  scratch.filled.assign(num_keys, 0);
  const int64_t first_answer = batch.prompt_begin[b];
  const int64_t num_answers = batch.prompt_begin[b + 1] - first_answer;
  for (int64_t j = 0; j < num_answers; ++j) {
    const int32_t g = votes.group_of[first_answer + j];
    if (g < 0) continue;
    PyList_SET_ITEM(scratch.lists[g], scratch.filled[g]++, from_int(j).release().ptr());
  }
  const int64_t w = votes.winner[b];
  const py::handle winner = w >= 0 ? py::handle(scratch.keys[w]) : py::handle(Py_None);
  return builder.build(winner, counts, indices);
}

// A slice of the batch: its answers (written by the converting thread before it is published) and
// its votes (written by whichever thread claims it, read after `voted`).
struct Chunk {
  Py_ssize_t begin = 0, end = 0;  // prompts [begin, end) of answers
  fastjudge::AnswerBatch batch;
  fastjudge::BatchVotes votes;
};

// Hands converted chunks to the threads that vote on them, in order; all state behind one mutex.
class ChunkQueue {
 public:
  explicit ChunkQueue(size_t num_chunks) : voted_(num_chunks, false) {}

  // The converting thread: chunks [0, count) are ready to vote on.
  void publish(size_t count) {
    std::lock_guard<std::mutex> lock(mutex_);
    published_ = count;
    changed_.notify_all();
  }
  // Stops the workers (after an error, or once everything is voted).
  void stop() {
    std::lock_guard<std::mutex> lock(mutex_);
    stopped_ = true;
    changed_.notify_all();
  }
  // Workers: the next chunk to vote on, waiting for one to be published; nullopt when none is left.
  std::optional<size_t> claim() {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] { return stopped_ || next_ < published_ || next_ == voted_.size(); });
    if (stopped_ || next_ == voted_.size()) return std::nullopt;
    return next_++;
  }
  // The building thread: the next published chunk if one is unclaimed, without waiting.
  std::optional<size_t> try_claim() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopped_ || next_ >= published_) return std::nullopt;
    return next_++;
  }
  void done(size_t c, std::exception_ptr error) {
    std::lock_guard<std::mutex> lock(mutex_);
    voted_[c] = true;
    if (error && !error_) error_ = error;
    changed_.notify_all();
  }
  bool is_voted(size_t c) {
    std::lock_guard<std::mutex> lock(mutex_);
    return voted_[c] || error_;
  }
  void wait_voted(size_t c) {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] { return voted_[c] || error_; });
  }
  std::exception_ptr error() {
    std::lock_guard<std::mutex> lock(mutex_);
    return error_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<bool> voted_;
  size_t published_ = 0, next_ = 0;
  bool stopped_ = false;
  std::exception_ptr error_;
};

void vote_chunk(Chunk& chunk, int64_t min_votes, ChunkQueue& queue, size_t c) {
  std::exception_ptr error;
  try {
    chunk.votes = fastjudge::vote_batch(chunk.batch, min_votes);
  } catch (...) {
    error = std::current_exception();  // bad_alloc; rethrown on the calling thread
  }
  queue.done(c, error);
}

// Worker threads that vote on claimed chunks; stopped and joined on destruction, also on errors.
class Workers {
 public:
  Workers(int count, std::vector<Chunk>& chunks, int64_t min_votes, ChunkQueue& queue) : queue_(queue) {
    for (int t = 0; t < count; ++t) {
      try {
        threads_.emplace_back([&chunks, min_votes, &queue] {
          while (const std::optional<size_t> c = queue.claim()) vote_chunk(chunks[*c], min_votes, queue, *c);
        });
      } catch (const std::system_error&) {
        break;  // no more threads to be had: fewer workers, the calling thread votes the rest
      }
    }
  }
  ~Workers() {
    queue_.stop();
    for (auto& thread : threads_) thread.join();  // workers never take the GIL: no deadlock
  }
  Workers(const Workers&) = delete;
  Workers& operator=(const Workers&) = delete;

 private:
  ChunkQueue& queue_;
  std::vector<std::thread> threads_;
};

// About 8k answers per chunk: big enough that handing chunks over is free, small enough that the
// first votes start early and the last build waits little.
constexpr size_t kChunkAnswers = 8192;

std::vector<Chunk> make_chunks(PyObject* outer) {
  std::vector<Chunk> chunks;
  const Py_ssize_t num_prompts = PySequence_Fast_GET_SIZE(outer);
  Py_ssize_t begin = 0;
  size_t answers = 0;
  for (Py_ssize_t b = 0; b < num_prompts; ++b) {
    answers += PySequence_Fast_GET_SIZE(PySequence_Fast_GET_ITEM(outer, b));
    if (answers >= kChunkAnswers || b + 1 == num_prompts) {
      chunks.emplace_back();
      chunks.back().begin = begin;
      chunks.back().end = b + 1;
      begin = b + 1;
      answers = 0;
    }
  }
  return chunks;
}

py::list majority_vote(py::handle answers, py::handle min_votes, int num_threads, py::handle vote_type) {
  const int64_t threshold = to_min_votes(min_votes);
  PyObject* outer = check_answers(answers);
  const ResultBuilder builder(vote_type);

  std::vector<Chunk> chunks = make_chunks(outer);
  // num_threads counts this thread; by default one thread per core, at most 8. No more workers than
  // chunks after the first: a batch of one chunk is voted here, since starting a thread costs more
  // than voting 8k answers.
  int threads = num_threads;
  if (threads <= 0) {
    threads = static_cast<int>(std::min(8u, std::max(1u, std::thread::hardware_concurrency())));
  }
  const size_t max_workers = chunks.empty() ? 0 : chunks.size() - 1;
  const int num_workers = static_cast<int>(std::min(static_cast<size_t>(threads - 1), max_workers));

  ChunkQueue queue(chunks.size());
  const Workers workers(num_workers, chunks, threshold, queue);
  for (size_t c = 0; c < chunks.size(); ++c) {
    chunks[c].batch = to_batch(outer, chunks[c].begin, chunks[c].end);  // a TypeError stops the workers
    queue.publish(c + 1);
  }

  py::list out(PySequence_Fast_GET_SIZE(outer));
  BuildScratch scratch;
  const GcPause gc_pause;
  for (size_t c = 0; c < chunks.size(); ++c) {
    if (!queue.is_voted(c)) {
      py::gil_scoped_release release;
      // Help with the voting rather than wait idle; this is all of it when there are no workers.
      while (!queue.is_voted(c)) {
        if (const std::optional<size_t> k = queue.try_claim()) {
          vote_chunk(chunks[*k], threshold, queue, *k);
        } else {
          queue.wait_voted(c);
        }
      }
    }
    if (const std::exception_ptr error = queue.error()) std::rethrow_exception(error);
    const Chunk& chunk = chunks[c];
    for (Py_ssize_t b = chunk.begin; b < chunk.end; ++b) {
      const size_t in_chunk = static_cast<size_t>(b - chunk.begin);
      py::object result = to_python(chunk.batch, chunk.votes, in_chunk, builder, scratch);
      PyList_SET_ITEM(out.ptr(), b, result.release().ptr());
    }
  }
  return out;
}

py::object normalize_answer(py::handle text) {
  if (!PyUnicode_Check(text.ptr())) {
    throw py::type_error("text must be str, got " + type_name(text.ptr()));
  }
  py::object keep;
  const std::optional<std::string> key = fastjudge::normalize_answer(utf8_of(text.ptr(), keep));
  return key ? from_utf8(*key) : py::none();
}

std::string shape_of(const py::array& a) {
  std::string out = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) out += (d ? ", " : "") + std::to_string(a.shape(d));
  return out + (a.ndim() == 1 ? ",)" : ")");
}

// Why row b failed (temperature > 0): the kernel only says that it had NaN, +inf or no finite value.
std::string bad_row_message(const float* row, int64_t vocab, int64_t b) {
  bool nan = false, pos_inf = false, finite = false;
  for (int64_t i = 0; i < vocab; ++i) {
    nan |= row[i] != row[i];
    pos_inf |= row[i] == std::numeric_limits<float>::infinity();
    finite |= std::abs(row[i]) < std::numeric_limits<float>::infinity();
  }
  const std::string where = "logits[" + std::to_string(b) + "]";
  if (nan) return where + " contains NaN";
  if (pos_inf) return where + " contains +inf";
  if (!finite) return where + " is all -inf: no token can be sampled";
  return where + " / temperature overflows float32: temperature is too small";
}

// logits (B, V) float32 C-contiguous, uniforms (B,) float64 -> tokens (B,) int64.
py::array_t<int64_t> sample_logits(const py::array& logits, const py::array& uniforms, double temperature,
                                   int64_t top_k, double top_p, double min_p, int num_threads) {
  if (logits.ndim() != 2 || logits.shape(0) == 0 || logits.shape(1) == 0) {
    throw py::value_error("logits must be a non-empty 2-D array (B, V), got shape " + shape_of(logits));
  }
  if (!logits.dtype().is(py::dtype::of<float>())) {
    throw py::value_error("logits must be float32, got " + std::string(py::str(logits.dtype())));
  }
  if (!(logits.flags() & py::array::c_style)) throw py::value_error("logits must be C-contiguous");
  const int64_t rows = logits.shape(0), vocab = logits.shape(1);
  if (vocab > std::numeric_limits<int32_t>::max()) {
    throw py::value_error("logits must have V < 2^31, got V = " + std::to_string(vocab));
  }
  if (uniforms.ndim() != 1 || uniforms.shape(0) != rows || !uniforms.dtype().is(py::dtype::of<double>()) ||
      !(uniforms.flags() & py::array::c_style)) {
    throw py::value_error("uniforms must be a contiguous float64 array (B,) with B = " + std::to_string(rows) +
                          ", got " + std::string(py::str(uniforms.dtype())) + " " + shape_of(uniforms));
  }
  if (!(temperature >= 0.0) || !std::isfinite(temperature)) {
    throw py::value_error("temperature must be finite and >= 0, got " + std::to_string(temperature));
  }
  if (top_k < 0) throw py::value_error("top_k must be >= 0, got " + std::to_string(top_k));
  if (!(top_p > 0.0 && top_p <= 1.0)) throw py::value_error("top_p must be in (0, 1], got " + std::to_string(top_p));
  if (!(min_p >= 0.0 && min_p < 1.0)) throw py::value_error("min_p must be in [0, 1), got " + std::to_string(min_p));
  const auto* u = static_cast<const double*>(uniforms.data());
  for (int64_t b = 0; b < rows; ++b) {
    if (!(u[b] >= 0.0 && u[b] < 1.0)) {
      throw py::value_error("uniforms must be in [0, 1), got uniforms[" + std::to_string(b) + "] = " +
                            std::to_string(u[b]));
    }
  }

  const auto* data = static_cast<const float*>(logits.data());
  py::array_t<int64_t> out(rows);
  int64_t* tokens = out.mutable_data();
  const fastjudge::SampleParams params{temperature, top_k, top_p, min_p};
  int64_t bad;
  {
    py::gil_scoped_release release;
    bad = fastjudge::sample_logits(data, rows, vocab, u, params, num_threads, tokens);
  }
  if (bad >= 0) throw py::value_error(bad_row_message(data + bad * vocab, vocab, bad));
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "fastjudge C++ core: answer normalization and majority voting (see fastjudge.core.voting), token sampling\n"
      "(see fastjudge.core.sampling).";

  m.def("normalize_answer", &normalize_answer, py::arg("text"),
        "Canonical form of one answer, or None when nothing is left (rules: fastjudge.core.voting).");

  m.def("majority_vote", &majority_vote, py::arg("answers"), py::arg("min_votes") = 1, py::kw_only(),
        py::arg("num_threads") = 0, py::arg("vote_type") = py::none(),
        "Majority vote over (B, N_b) answers. Returns a list of B (winner, counts, indices) tuples,\n"
        "or of vote_type instances (a frozen dataclass with those fields, e.g. fastjudge.core.voting.Vote).\n"
        "num_threads counts the calling thread; <= 0 means one per core (at most 8). The GIL is\n"
        "released while this thread votes or waits for votes.");

  m.def("sample_logits", &sample_logits, py::arg("logits"), py::arg("uniforms"), py::kw_only(),
        py::arg("temperature") = 1.0, py::arg("top_k") = 0, py::arg("top_p") = 1.0, py::arg("min_p") = 0.0,
        py::arg("num_threads") = 0,
        "One token per row of logits (B, V) (float32, C-contiguous) -> (B,) int64, driven by uniforms\n"
        "(B,) float64 in [0, 1): temperature (0 = argmax), top-k, top-p, min-p, then inverse-CDF over the\n"
        "kept tokens in index order (rules: fastjudge.core.sampling). num_threads counts the calling thread;\n"
        "<= 0 means one per core (at most 8). The GIL is released while sampling. Raises ValueError\n"
        "naming the argument, or the row of logits that holds NaN/+inf or only -inf (temperature > 0).");
}
