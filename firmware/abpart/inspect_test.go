package abpart

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/gwagent/gwagent/firmware/bootenv"
)

// Inspect reads what Status reads and changes nothing on the device: no
// state folder, no record, no environment write.
func TestInspect(t *testing.T) {
	for _, backend := range envBackends {
		t.Run(backend, func(t *testing.T) {
			ctx := t.Context()
			d := newDevice(t, backend)
			inspect := func(what string) Status {
				t.Helper()
				before := listTree(t, d.dir)
				st, err := Inspect(ctx, d.config(), d.env)
				if err != nil {
					t.Fatalf("%s: %v", what, err)
				}
				if after := listTree(t, d.dir); !reflect.DeepEqual(before, after) {
					t.Fatalf("%s: Inspect changed the device:\nbefore %v\nafter  %v", what, before, after)
				}
				return st
			}
			st := inspect("before the agent ran")
			if st.Running != "A" || st.TrialSlot != "" || st.UpdateID != "" || !st.Slots[0].Committed || st.Env.Slot != "A" {
				t.Fatalf("Inspect before any update = %+v", st)
			}
			if _, err := os.Stat(d.stateDir); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("Inspect created the state folder: %v", err)
			}

			inst := d.installer()
			img := newImage(t, 100<<10)
			if err := d.write(inst, img); err != nil {
				t.Fatal(err)
			}
			if err := inst.Apply(ctx, d.readBack(inst, img)); err != nil {
				t.Fatal(err)
			}
			want, err := inst.Status(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if got := inspect("trial armed"); !reflect.DeepEqual(got, want) || got.TrialSlot != "B" || got.UpdateID != img.u.ID {
				t.Fatalf("Inspect = %+v\nStatus  = %+v", got, want)
			}
		})
	}
}

func TestInspectEnvIsReadOnly(t *testing.T) {
	env := readOnlyEnv{openEnvFile(t, filepath.Join(t.TempDir(), "env"))}
	if err := env.Set(context.Background(), map[string]string{bootenv.VarSlot: "B"}); !errors.Is(err, errReadOnly) {
		t.Fatalf("Set through Inspect's environment: %v", err)
	}
}

// listTree is every path under dir with its size, mode and modification
// time.
func listTree(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := de.Info()
		if err != nil {
			return err
		}
		out[p] = fmt.Sprintf("%d %v %d", fi.Size(), fi.Mode(), fi.ModTime().UnixNano())
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}
