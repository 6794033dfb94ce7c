package firmware

import "os"

// SetStateWriter replaces how the Manager of c writes its state files, so
// a test can make the disk look full.
func SetStateWriter(c *Config, write func(path string, data []byte, perm os.FileMode) error) {
	c.writeFile = write
}
