/* LD_PRELOAD shim: the test guest kernel has no SysV IPC (CONFIG_SYSVIPC off),
 * which fio needs for its job area; back shmget/shmat with shared anonymous
 * mmap instead (fio runs with --thread, so nothing crosses a process). */
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/shm.h>
#define MAXSEG 256
static struct { void *p; size_t sz; } seg[MAXSEG];
static int nseg;
int shmget(key_t key, size_t size, int flg) {
  (void)key; (void)flg;
  if (nseg >= MAXSEG) { errno = ENOSPC; return -1; }
  void *p = mmap(0, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return -1;
  seg[nseg].p = p; seg[nseg].sz = size;
  return nseg++;
}
void *shmat(int id, const void *addr, int flg) {
  (void)addr; (void)flg;
  if (id < 0 || id >= nseg || !seg[id].p) { errno = EINVAL; return (void *)-1; }
  return seg[id].p;
}
int shmdt(const void *addr) { (void)addr; return 0; }
int shmctl(int id, int cmd, struct shmid_ds *buf) {
  if (id < 0 || id >= nseg) { errno = EINVAL; return -1; }
  if (cmd == IPC_STAT && buf) {
    memset(buf, 0, sizeof *buf);
    buf->shm_segsz = seg[id].sz;
    buf->shm_nattch = 1;
  }
  return 0;
}
