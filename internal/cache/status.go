package cache

import (
	"bytes"

	bolt "go.etcd.io/bbolt"
)

// LatestRejections returns at most n entries of the rejection log, newest
// first, walking the time index from its end: the cost is n lookups however
// long the log is.
func (d *DB) LatestRejections(n int) (out []Rejection, err error) {
	err = d.view(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketRejectOrder).Cursor()
		for k, _ := c.Last(); k != nil && len(out) < n; k, _ = c.Prev() {
			if len(k) <= 8 {
				continue
			}
			r, err := get[Rejection](tx, bucketRejections, string(k[8:]))
			if err != nil {
				return err
			}
			if r != nil {
				out = append(out, *r)
			}
		}
		return nil
	})
	return out, err
}

// AttestationsByKey counts the stored attestations of each attester public
// key ("name:base64"). It reads only keys (hash "/" public key), never
// decodes an attestation, but it visits every one.
func (d *DB) AttestationsByKey() (map[string]int, error) {
	counts := map[string]int{}
	err := d.view(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketAttestations).ForEach(func(k, _ []byte) error {
			if i := bytes.IndexByte(k, '/'); i >= 0 {
				counts[string(k[i+1:])]++
			}
			return nil
		})
	})
	return counts, err
}
