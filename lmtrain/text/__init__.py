"""Text files -> tokens: the corpus and its checks (corpus), the tokenizer (tokenizer), token files
(tokens), the cached encoding of a corpus (encode) and text read as lines (lines).

This is the stage's face: other stages import from `lmtrain.text` only."""

from lmtrain.text.corpus import BUILTIN, Corpus, ENCODING_ERRORS, Text, copy_stream, load_corpus, load_text
from lmtrain.text.encode import cache_dir, encode_corpus, encode_in_memory, encode_split, get_tokenizer, sampled_pieces
from lmtrain.text.lines import stream_lines, text_lines
from lmtrain.text.tokenizer import EOS, EOS_ID, Tokenizer, UNK_ID, train_tokenizer
from lmtrain.text.tokens import TokenFile, batchify, lazy_batchify, windows

__all__ = [
    "BUILTIN", "Corpus", "ENCODING_ERRORS", "EOS", "EOS_ID", "Text", "TokenFile", "Tokenizer", "UNK_ID",
    "batchify", "cache_dir", "copy_stream", "encode_corpus", "encode_in_memory", "encode_split", "get_tokenizer",
    "lazy_batchify", "load_corpus", "load_text", "sampled_pieces", "stream_lines", "text_lines", "train_tokenizer",
    "windows"
]
