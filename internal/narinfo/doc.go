// Package narinfo parses, renders and checks Nix binary-cache metadata: .narinfo
// files, store paths, Nix hashes, signature fingerprints and content addresses.
//
// Trust model: nothing in this package trusts its input. Parse accepts exactly what
// Nix's libstore accepts (plus a few stricter checks where Nix's leniency would make
// the proxy and the client disagree about what a narinfo says) and rejects the rest
// with an error naming the offending key. The package never verifies signatures
// itself; it produces the exact byte string (Fingerprint) that signatures cover, so
// that callers verify against keys they chose. VerifyCA is the one place that
// establishes trust on its own: it recomputes a store path from a narinfo's CA field
// exactly as Nix does, which proves the path commits to that content hash without
// trusting any signer. It does not prove that the NAR a cache serves has that hash
// (except for "fixed:r:sha256", where CA hash and NarHash coincide and are compared);
// see VerifyCA and CA.
package narinfo
