package narinfo

// Compression is a narinfo's Compression field. It is kept as written, so an
// unknown value survives a round trip and can be reported; Supported says
// whether cacheproxy can decode, and so verify, it.
type Compression string

// The compressions Nix writes and cacheproxy verifies.
const (
	CompressionNone   Compression = "none"
	CompressionXZ     Compression = "xz"
	CompressionZstd   Compression = "zstd"
	CompressionBzip2  Compression = "bzip2"
	CompressionBrotli Compression = "br"
)

// Supported reports whether NARs in this compression can be verified.
func (c Compression) Supported() bool {
	for _, s := range Compressions() {
		if c == s {
			return true
		}
	}
	return false
}

// Ext is the file extension Nix gives NAR files in this compression, after
// ".nar" ("" for none and for unsupported values).
func (c Compression) Ext() string {
	switch c {
	case CompressionXZ:
		return ".xz"
	case CompressionZstd:
		return ".zst"
	case CompressionBzip2:
		return ".bz2"
	case CompressionBrotli:
		return ".br"
	}
	return ""
}

// Compressions is the one list of supported compressions.
func Compressions() []Compression {
	return []Compression{CompressionNone, CompressionXZ, CompressionZstd, CompressionBzip2, CompressionBrotli}
}
