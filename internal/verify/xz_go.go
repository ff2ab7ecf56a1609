//go:build !liblzma

package verify

// Without `-tags liblzma` the xz decoder is the pure-Go one: the build
// needs no C toolchain and no liblzma.

// xzDecoderName says which xz decoder this binary uses.
const xzDecoderName = "Go (github.com/therootcompany/xz)"

var xzCodec = goXZCodec
