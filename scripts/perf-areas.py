#!/usr/bin/env python3
"""Groups a `perf report --no-children --sort dso,sym --stdio` listing by crate and kernel area.

    perf record -F 999 -p PID1,PID2,PID3 -o nodes.data -- sleep 15
    perf report -i nodes.data --no-children --sort dso,sym --stdio > syms.txt
    scripts/perf-areas.py syms.txt [--kernel]    # --kernel: also the unclassified kernel lines

See docs/performance.md.
"""
import re,collections,sys
groups=collections.OrderedDict([
 ('kernel: scheduler, wake-ups, context switches',r'\[k\]\s+(finish_task_switch|__schedule|schedule|_raw_spin_unlock_irq|native_write_msr|smp_call_function|try_to_wake|ttwu|__raw_callee|_raw_spin_lock|futex|irqentry|dequeue|enqueue|update_|pick_next|switch_|__switch|select_task|psi_|cpuacct|set_next|put_prev|native_sched|raw_spin_rq|__wake_up|wake_up|prepare_task|sched_|do_nanosleep|hrtimer|__x64_sys_futex|ep_poll|__perf|perf_)'),
 ('kernel: virtio disk kick (iowrite16)',r'iowrite16'),
 ('kernel: network (softirq, tcp, netfilter)',r'\[k\]\s+(handle_softirqs|tcp_|ipt_|nf_|__dev_queue|ip_|net_|sock_|skb|_copy_to_iter|_copy_from_iter|__netif|loopback|__tcp|inet_|__sys_sendto|__sys_recvfrom|sk_|release_sock|lock_sock|__ip|dev_hard|process_backlog|__napi|validate_xmit|__kfree_skb|kfree_skb)'),
 ('kernel: block, fs, io_uring',r'\[k\]\s+(xas_|find_get_block|ext4|jbd2|blk_|bio_|submit_bio|io_|__io|filemap|iomap|virtblk|virtqueue|__block|mpage|folio|generic_perform|file_|vfs_|fget|fput|do_iter)'),
 ('kernel: other',r'\[k\]'),
 ('allocator (malloc/free)',r'(malloc|_int_free|cfree|unlink_chunk|\bfree\b|_int_realloc|realloc|__rust_no_alloc|calloc|__rdl_alloc|__rust_alloc|__rust_dealloc)'),
 ('memcpy/memmove/memcmp',r'(memmove|memcpy|memset|memcmp)'),
 ('clock_gettime',r'clock_gettime'),
 ('openraft',r'openraft'),
 ('glommio (executor, io_uring)',r'(glommio::|_io_uring|io_uring)'),
 ('tonic/h2/hyper/tower (gRPC, HTTP/2)',r'(tonic::|h2::|hyper::|tower::|hyper_util|http::|http_body)'),
 ('prost (protobuf)',r'(prost::|::encode|::decode|encoded_len|merge_field)'),
 ('tokio (runtime, sync)',r'tokio::'),
 ('crc32c',r'crc32c'),
 ('bytes',r'bytes::'),
 ('tern: log / partition / raft glue',r'tern::'),
 ('tracing',r'tracing'),
 ('crossbeam, flume, futures channels',r'(crossbeam|flume|futures_channel)'),
])
tot=collections.Counter(); other=collections.Counter()
for l in open(sys.argv[1]):
    m=re.match(r'\s*([\d.]+)%\s+(.*)',l)
    if not m: continue
    pct=float(m.group(1)); rest=m.group(2)
    for g,pat in groups.items():
        if re.search(pat,rest):
            tot[g]+=pct;break
    else:
        tot['other']+=pct; other[rest.strip()[:90]]+=pct
for g,v in sorted(tot.items(),key=lambda x:-x[1]): print(f'{v:6.2f}%  {g}')
if '--kernel' in sys.argv[2:]:
  print('top kernel other / other:')
  ko=collections.Counter()
  for l in open(sys.argv[1]):
    m=re.match(r'\s*([\d.]+)%\s+(.*)',l)
    if m and '[k]' in m.group(2):
      r=m.group(2)
      if not any(re.search(p,r) for g,p in list(groups.items())[:4]): ko[r.split('[k]')[1].strip()]+=float(m.group(1))
  for k,v in ko.most_common(15): print(f'  {v:5.2f} {k}')
