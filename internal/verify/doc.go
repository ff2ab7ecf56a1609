// Package verify holds the cryptographic and integrity checks of cacheproxy:
// Nix binary-cache signing keys and signatures, and a streaming verifier for
// NAR downloads.
//
// Trust model. Nothing an upstream sends is trusted until it has been checked
// here. A narinfo is trusted only through an ed25519 signature, by a key the
// operator configured, over its fingerprint (PublicKey.Verify, VerifyAny); the
// fingerprint itself is built by package narinfo. A NAR is trusted only
// through the narinfo that approved it: a Verifier is fed the compressed bytes
// exactly as the upstream sends them and checks FileSize/FileHash over those
// bytes, and NarSize/NarHash over the decompressed NAR, because NarHash is
// what the signature covers and what Nix itself checks after substitution.
// For content-addressed flat paths it can additionally prove that the NAR is a
// single regular file whose contents hash to the store path's content address.
//
// The Verifier never buffers a whole NAR (memory is bounded by a few buffers
// and the decoder's window), never decodes past the declared NarSize, and
// reports the first disagreement as an *Error naming the failed Check, with
// the label values of the cacheproxy_nar_verification_failures_total metric.
// It only says "good" from Finish, after the last byte, so callers can hold
// back the final bytes of a response until then.
//
// The package knows nothing about HTTP, storage or policy.
package verify
