//go:build liblzma && !cgo

package verify

// `-tags liblzma` needs cgo (CGO_ENABLED=1, a C compiler, liblzma's
// headers): fail the build by name rather than fall back to the Go decoder
// unnoticed.
var _ = the_liblzma_build_tag_needs_cgo_set_CGO_ENABLED_1
