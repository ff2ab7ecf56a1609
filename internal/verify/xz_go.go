//go:build !liblzma

package verify

// Without `-tags liblzma` the xz decoder is the pure-Go one: the build
// needs no C toolchain and no liblzma.

// XZDecoder names the xz decoder this binary was built with (cacheproxy
// --version prints it).
const XZDecoder = "Go (github.com/therootcompany/xz)"

var xzCodec = goXZCodec
