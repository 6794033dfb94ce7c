package abpart

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gwagent/gwagent/firmware/bootenv"
)

const bootloaderDir = "../../packaging/bootloader"

// TestBootloaderScripts checks the shipped bootloader side: the GRUB snippet
// parses with GRUB's own checker, the U-Boot script packs with mkimage, and
// both (and the README) use every contract variable and the command-line
// parameter runningSlot reads.
func TestBootloaderScripts(t *testing.T) {
	requireTools(t, "grub-script-check", "mkimage")
	grub := filepath.Join(bootloaderDir, "grub.cfg.snippet")
	uboot := filepath.Join(bootloaderDir, "uboot-boot.scr.txt")
	if out, err := exec.Command("grub-script-check", grub).CombinedOutput(); err != nil {
		t.Fatalf("grub-script-check %s: %v\n%s", grub, err, out)
	}
	scr := filepath.Join(t.TempDir(), "boot.scr")
	if out, err := exec.Command("mkimage", "-A", "arm64", "-T", "script", "-C", "none", "-n", "gwagent", "-d", uboot, scr).CombinedOutput(); err != nil {
		t.Fatalf("mkimage %s: %v\n%s", uboot, err, out)
	}
	for _, f := range []string{grub, uboot, filepath.Join(bootloaderDir, "README.md")} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, name := range []string{bootenv.VarSlot, bootenv.VarUpgradeAvailable, bootenv.VarBootCount, bootenv.VarBootLimit, "gwagent.slot="} {
			if !strings.Contains(string(b), name) {
				t.Errorf("%s does not mention %s", f, name)
			}
		}
	}
}
